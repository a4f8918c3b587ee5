package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"time"

	"github.com/extractedprism/extractedprism/pkg/config"
	"github.com/extractedprism/extractedprism/pkg/probe"
	"github.com/extractedprism/extractedprism/pkg/readiness"
	"github.com/extractedprism/extractedprism/pkg/upstream"
)

// ServiceAccountCA is where a pod finds its cluster's CA; probe.ca_file ""
// verifies the apiservers against it when it exists.
const ServiceAccountCA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

// probeReporter feeds probe rounds to the upstream set.
type probeReporter struct{ d *daemon }

func (r probeReporter) Report(addr string, res probe.Result) {
	r.d.set.ReportProbe(addr, upstream.ProbeReport{OK: res.OK(), Latency: res.Latency, Err: res.Err, Note: res.Note, Shared: res.Shared})
}

// probeObserved records a round in the metrics and says once per upstream
// when its readiness cannot be checked.
func (d *daemon) probeObserved(addr string, r probe.Result) {
	now := time.Now()
	d.lastProbeAt.Store(now.UnixNano())
	u := d.set.Lookup(addr)
	if u == nil {
		return
	}
	if m := upstreamMetrics(u); m != nil {
		if r.Latency > 0 {
			m.ProbeDone(r.OK(), r.Latency, now)
		}
		m.SetReadiness(r.Note != "", r.Shared)
	}
	if r.Note == "" {
		d.unknownWarned.Delete(addr)
		return
	}
	if _, warned := d.unknownWarned.LoadOrStore(addr, true); !warned {
		d.log.Warn("upstream answers probes but not about its readiness; routing to it on liveness alone",
			"upstream", addr, "answer", r.Note,
			"fix", "give probe credentials (probe.bearer_token_file, or probe.client_cert_file and probe.client_key_file), "+
				"or allow anonymous access to /readyz, /livez and /healthz with kube-apiserver's AuthenticationConfiguration anonymous.conditions")
	}
}

// probeTLS returns the probes' TLS configuration: verification against
// probe.ca_file, or the service-account CA where it exists when that is
// "", or none.
func (d *daemon) probeTLS(pc config.Probe) *tls.Config {
	caFile := pc.CAFile
	if caFile == "" {
		if _, err := os.Stat(ServiceAccountCA); err == nil {
			caFile = ServiceAccountCA
		}
	}
	if caFile == config.ProbeCANone {
		caFile = ""
	}
	if caFile == "" && pc.ServerName == "" {
		return nil
	}
	tlsConf := &tls.Config{ServerName: pc.ServerName, MinVersion: tls.VersionTLS12}
	if caFile == "" {
		tlsConf.InsecureSkipVerify = true //nolint:gosec // verification only with a CA
		return tlsConf
	}
	pool := x509.NewCertPool()
	if pem, err := os.ReadFile(caFile); err != nil || !pool.AppendCertsFromPEM(pem) { //nolint:gosec // an operator-configured CA path
		d.log.Error("probe CA unusable; probes will fail verification", "file", caFile, "err", err)
	}
	tlsConf.RootCAs = pool
	return tlsConf
}

// sharedVerdict returns the cluster's shared readiness verdict for addr,
// if one is fresh. A shared verdict only ever lowers preference: when it
// would leave no upstream ready, the node checks readiness itself.
func (d *daemon) sharedVerdict(addr string) (probe.Verdict, bool) {
	w := d.shared.Load()
	if w == nil {
		return probe.Verdict{}, false
	}
	v, fresh := w.Lookup(addr)
	if !fresh {
		return probe.Verdict{}, false
	}
	if !v.Ready {
		anyReady := false
		for _, a := range d.set.Addresses() {
			if o, ok := w.Lookup(a); !ok || o.Ready {
				anyReady = true
				break
			}
		}
		if !anyReady {
			return probe.Verdict{}, false
		}
	}
	return v, true
}

// verdicts is what the daemon needs of the shared readiness watcher.
type verdicts interface {
	Lookup(addr string) (probe.Verdict, bool)
}

// verdictsBox lets an interface value live in an atomic.Pointer.
type verdictsBox struct{ verdicts }

// sharedAdapter turns the readiness watcher's verdicts into the prober's.
type sharedAdapter struct{ w *readiness.Watcher }

func (a sharedAdapter) Lookup(addr string) (probe.Verdict, bool) {
	v, ok := a.w.Lookup(addr)
	return probe.Verdict{Ready: v.Ready, Code: v.Code, Reason: v.Reason}, ok
}

// startShared starts the shared readiness watcher that cfg names, if any,
// with the discovery client's credentials. Without usable credentials the
// node keeps checking readiness itself, and says so.
func (d *daemon) startShared(cfg config.Config) {
	d.shared.Store(nil)
	sr := cfg.Probe.SharedReadiness
	m := d.disc.Load()
	if sr.Namespace == "" || m == nil {
		return
	}
	client, closeIdle, err := m.Client()
	if err != nil {
		d.log.Error("shared readiness unavailable; every node checks readiness itself", "configmap", sr.Namespace+"/"+sr.Name, "err", err)
		return
	}
	w := readiness.NewWatcher(readiness.WatcherOptions{
		Client: client, Namespace: sr.Namespace, Name: sr.Name, StaleAfter: sr.StaleAfter,
		Logger: d.log.With("component", "shared-readiness"),
		// A changed verdict applies at once, without probing.
		OnChange: func() { d.prober.reassess() },
	})
	d.shared.Store(&verdictsBox{sharedAdapter{w}})
	d.sharedRunner = startRunner(d.group, d.groupCtx, func(ctx context.Context) error {
		defer closeIdle()
		return w.Run(ctx)
	})
}

// stopShared stops the shared readiness watcher, if one runs.
func (d *daemon) stopShared() {
	d.shared.Store(nil)
	if d.sharedRunner != nil {
		d.sharedRunner.stop()
		d.sharedRunner = nil
	}
}

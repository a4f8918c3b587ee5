// Package staticpod upgrades extractedprism's kubeadm static pod without
// a moment in which nobody serves the node's API path.
//
// The kubelet starts a changed static pod only after the old one has
// exited, so editing the manifest in place leaves 127.0.0.1:7445 closed
// between the two (about 10 s). Upgrade instead starts the new version as
// a second static pod, in the free one of two slots (NAME and
// NAME+SlotSuffix), which binds the ports beside the running one
// (SO_REUSEPORT: both run as the balancer's own UID, and new connections
// go to the newest socket); once the new pod answers ready on the admin
// port, it removes the old slot's manifest, and the old pod, seeing a
// successor on the port, stops accepting at once and drains its
// established connections. Nothing is refused, and each established
// stream is cut at most once.
//
// Upgrade owns the two slot files in the static pod directory while it
// runs; the kubelet owns the pods.
package staticpod

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/extractedprism/extractedprism/pkg/proxy"
	"github.com/extractedprism/extractedprism/pkg/status"
)

// Options configure Upgrade. Zero values get the defaults documented per
// field.
type Options struct {
	// Dir is the kubelet's static pod directory (default
	// /etc/kubernetes/manifests).
	Dir string
	// Manifest is the new version's manifest (required): the shipped
	// kubeadm manifest with its image or flags changed. Its metadata.name
	// names the slots; a trailing SlotSuffix is ignored.
	Manifest []byte
	// Admin is the admin server's host:port (default 127.0.0.1:7446).
	Admin string
	// HTTP fetches /status (default: a client with a 5 s timeout and no
	// kept-alive connections, so each poll reaches the newest socket).
	HTTP *http.Client
	// Listeners counts the listening sockets on an address (default
	// proxy.ListenerCount).
	Listeners func(addr string) (int, error)
	// ReadyTimeout bounds the wait for the new pod to answer ready
	// (default 3 minutes: an image pull, and the kubelet's own delays).
	ReadyTimeout time.Duration
	// StepAsideTimeout bounds the wait for the old pod to leave the port
	// after its manifest is removed (default 2 minutes).
	StepAsideTimeout time.Duration
	// Poll is the interval between checks (default 500 ms).
	Poll time.Duration
	// AllowGap permits replacing the running pod in place when it cannot
	// share its ports (it binds without SO_REUSEPORT, as releases before
	// this handover did, or it does not answer): connects are then
	// refused between the old pod's exit and the new one's start.
	AllowGap bool
	// Logger reports progress (default: discard).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
}

func (o Options) withDefaults() Options {
	if o.Dir == "" {
		o.Dir = "/etc/kubernetes/manifests"
	}
	if o.Admin == "" {
		o.Admin = "127.0.0.1:7446"
	}
	if o.HTTP == nil {
		o.HTTP = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}}
	}
	if o.Listeners == nil {
		o.Listeners = proxy.ListenerCount
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 3 * time.Minute
	}
	if o.StepAsideTimeout <= 0 {
		o.StepAsideTimeout = 2 * time.Minute
	}
	if o.Poll <= 0 {
		o.Poll = 500 * time.Millisecond
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// Result is what an upgrade did.
type Result struct {
	// From and To are the manifest files of the old and the new pod (the
	// same file for an in-place replacement).
	From, To string
	// InPlace is set when the running pod was replaced in place (AllowGap).
	InPlace bool
	// Resumed is set when an interrupted upgrade to the same manifest was
	// found and finished.
	Resumed bool
	// Old and New are the /status answers of the old and the new pod.
	Old, New status.Document
	// ReadyAfter is how long the new pod took to answer ready.
	ReadyAfter time.Duration
	// SteppedAsideAfter is how long the old pod took to leave the port
	// after its manifest was removed (0 for InPlace).
	SteppedAsideAfter time.Duration
}

// Upgrade installs o.Manifest as the static pod's new version without
// leaving the port unserved (see the package comment). On a new pod that
// does not become ready within ReadyTimeout it removes the new manifest
// again, so the old pod goes on serving, and returns an error.
func Upgrade(ctx context.Context, o Options) (Result, error) {
	o = o.withDefaults()
	var res Result
	next, err := parseManifest(o.Manifest, "new manifest")
	if err != nil {
		return res, err
	}
	base := next.baseName()
	slots, err := findSlots(o.Dir, base)
	if err != nil {
		return res, err
	}
	cur, err := fetchStatus(ctx, o)
	curOK := err == nil
	if curOK {
		res.Old = cur
	}
	switch len(slots) {
	case 0:
		return res, fmt.Errorf("no static pod named %s or %s%s in %s: install the manifest there first (docs/kubeadm.md)", base, base, SlotSuffix, o.Dir)
	case 2:
		return resume(ctx, o, next, slots, res)
	}
	old := slots[0]
	if old.sameAs(next) {
		return res, fmt.Errorf("%s already holds this manifest: nothing to upgrade", old.path)
	}
	shareable := curOK && cur.ReusePort && !cur.ShuttingDown
	reuse, why := next.reusePort()
	if !reuse {
		return res, fmt.Errorf("new manifest: %s: the new pod could not bind the ports beside the running one", why)
	}
	if !shareable {
		if !o.AllowGap {
			reason := "it binds its ports without SO_REUSEPORT (listen.reuse_port), as releases before the handover did"
			if !curOK {
				reason = fmt.Sprintf("it does not answer on %s (%v)", o.Admin, err)
			}
			return res, fmt.Errorf("the running pod (%s) cannot hand over without a gap: %s; "+
				"--allow-gap replaces it in place, refusing connects until the new pod has started (later upgrades then refuse nothing)", old.path, reason)
		}
		return inPlace(ctx, o, next, old, res)
	}
	target := base
	if old.name == base {
		target = base + SlotSuffix
	}
	res.From, res.To = old.path, slotFile(o.Dir, target)
	if _, err := os.Stat(res.To); err == nil {
		return res, fmt.Errorf("%s exists but holds no pod named %s: move it away first", res.To, target)
	}
	data, err := next.withName(target)
	if err != nil {
		return res, err
	}
	if err := writeFile(res.To, data); err != nil {
		return res, err
	}
	o.Logger.Info("new pod's manifest written beside the running one", "manifest", res.To, "running", cur.Instance, "version", cur.Version)
	began := o.Now()
	res.New, err = waitReady(ctx, o, func(d status.Document) bool { return d.Instance != cur.Instance })
	if err != nil {
		if ctx.Err() != nil {
			return res, fmt.Errorf("interrupted with both %s and %s in place (both pods may serve): run the upgrade again to finish it, or remove %s to go back: %w", res.From, res.To, res.To, err)
		}
		if rmErr := os.Remove(res.To); rmErr != nil {
			return res, fmt.Errorf("the new pod did not become ready: %w; removing %s failed too: %w", err, res.To, rmErr)
		}
		return res, fmt.Errorf("the new pod did not become ready within %s: %w; %s was removed again and the running pod goes on serving (its logs: crictl logs $(crictl ps -a -q --name extractedprism | head -1))", o.ReadyTimeout, err, res.To)
	}
	res.ReadyAfter = o.Now().Sub(began)
	o.Logger.Info("new pod ready", "instance", res.New.Instance, "version", res.New.Version, "after", res.ReadyAfter.Round(time.Millisecond))
	return retire(ctx, o, old.path, res)
}

// resume finishes an upgrade that was interrupted with both slots in
// place: the slot that holds the new manifest stays, the other goes once
// the port's newest instance answers ready.
func resume(ctx context.Context, o Options, next *manifest, slots []*manifest, res Result) (Result, error) {
	keep, drop := slots[0], slots[1]
	if drop.sameAs(next) {
		keep, drop = drop, keep
	}
	if !keep.sameAs(next) {
		return res, fmt.Errorf("both %s and %s are in place and neither holds the new manifest (an earlier upgrade was interrupted): remove the one that should not run, then upgrade again", slots[0].path, slots[1].path)
	}
	res.From, res.To, res.Resumed = drop.path, keep.path, true
	o.Logger.Info("finishing an interrupted upgrade", "keep", keep.path, "remove", drop.path)
	began := o.Now()
	d, err := waitReady(ctx, o, func(status.Document) bool { return true })
	if err != nil {
		return res, fmt.Errorf("both %s and %s are in place and no pod answers ready: %w; remove the one that should not run", keep.path, drop.path, err)
	}
	res.New, res.ReadyAfter = d, o.Now().Sub(began)
	return retire(ctx, o, drop.path, res)
}

// retire removes the old pod's manifest and waits until the old pod has
// left the port (the kubelet stopped it and it stepped aside for the new
// one); its established connections then drain.
func retire(ctx context.Context, o Options, oldPath string, res Result) (Result, error) {
	if err := os.Remove(oldPath); err != nil {
		return res, fmt.Errorf("remove the old pod's manifest: %w (both pods serve meanwhile)", err)
	}
	o.Logger.Info("old pod's manifest removed", "manifest", oldPath)
	listen := res.New.Listen
	if listen == "" {
		return res, nil
	}
	began := o.Now()
	err := poll(ctx, o, o.StepAsideTimeout, func() (bool, error) {
		n, err := o.Listeners(listen)
		if err != nil {
			return false, err
		}
		if n > 1 {
			return false, fmt.Errorf("%d sockets listen on %s", n, listen)
		}
		return true, nil
	})
	if err != nil {
		return res, fmt.Errorf("the old pod has not left %s within %s: %w; the kubelet stops it (its manifest is gone), and the new pod serves meanwhile", listen, o.StepAsideTimeout, err)
	}
	res.SteppedAsideAfter = o.Now().Sub(began)
	o.Logger.Info("old pod stepped aside: it drains its established connections (proxy.drain_timeout)", "after", res.SteppedAsideAfter.Round(time.Millisecond))
	return res, nil
}

// inPlace replaces the running pod's manifest, leaving the gap the kubelet
// leaves between two versions of one static pod.
func inPlace(ctx context.Context, o Options, next, old *manifest, res Result) (Result, error) {
	res.From, res.To, res.InPlace = old.path, old.path, true
	data, err := next.withName(old.name)
	if err != nil {
		return res, err
	}
	if err := writeFile(old.path, data); err != nil {
		return res, err
	}
	o.Logger.Warn("replacing the running pod in place: connects are refused until the new pod has started", "manifest", old.path)
	began := o.Now()
	// The old pod drains first (proxy.drain_timeout), then the kubelet
	// starts the new one.
	o.ReadyTimeout += 2 * time.Minute
	res.New, err = waitReady(ctx, o, func(d status.Document) bool {
		return d.Instance != "" && d.Instance != res.Old.Instance
	})
	if err != nil {
		return res, fmt.Errorf("the new pod did not become ready within %s: %w", o.ReadyTimeout, err)
	}
	res.ReadyAfter = o.Now().Sub(began)
	return res, nil
}

// waitReady polls /status until an instance that is wanted answers ready
// and is not shutting down, for at most o.ReadyTimeout.
func waitReady(ctx context.Context, o Options, wanted func(status.Document) bool) (status.Document, error) {
	var last status.Document
	err := poll(ctx, o, o.ReadyTimeout, func() (bool, error) {
		d, err := fetchStatus(ctx, o)
		if err != nil {
			return false, err
		}
		switch {
		case !wanted(d):
			return false, fmt.Errorf("only the old pod (instance %s) answers", d.Instance)
		case d.ShuttingDown:
			return false, fmt.Errorf("instance %s is shutting down", d.Instance)
		case !d.Ready:
			return false, fmt.Errorf("instance %s (version %s) is not ready: %s", d.Instance, d.Version, d.Reason)
		}
		last = d
		return true, nil
	})
	return last, err
}

// poll calls check every o.Poll until it reports done, for at most
// timeout; the error is check's last.
func poll(ctx context.Context, o Options, timeout time.Duration, check func() (bool, error)) error {
	deadline := o.Now().Add(timeout)
	t := time.NewTicker(o.Poll)
	defer t.Stop()
	var last error
	for {
		done, err := check()
		if done {
			return nil
		}
		last = err
		if !o.Now().Before(deadline) {
			if last == nil {
				last = errors.New("timed out")
			}
			return last
		}
		select {
		case <-ctx.Done():
			return errors.Join(ctx.Err(), last)
		case <-t.C:
		}
	}
}

// fetchStatus reads the admin server's /status.
func fetchStatus(ctx context.Context, o Options) (status.Document, error) {
	var d status.Document
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+o.Admin+"/status", nil)
	if err != nil {
		return d, err
	}
	resp, err := o.HTTP.Do(req)
	if err != nil {
		return d, fmt.Errorf("GET /status: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		return d, fmt.Errorf("GET /status: %s: %w", resp.Status, err)
	}
	return d, nil
}

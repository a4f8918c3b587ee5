package main

import (
	"context"
	"fmt"
	"syscall"
	"time"
)

// The anonymous-authentication-off scenarios: the stand-ins run with
// --anonymous-auth=false (401 to every request without credentials, health
// paths included), the load clients authenticate with a client certificate
// as kubelets do, and one stand-in is SIGSTOPped for anonOffStop.
const (
	anonOffStop = 10 * time.Second
	// anonOffFrom and anonOffTo bound the window, after the SIGSTOP, in
	// which the bad requests are counted: by then a balancer that still
	// knows which upstream is alive has moved off the stopped one.
	anonOffFrom = 5 * time.Second
	anonOffTo   = 10 * time.Second
)

// anonOffResult is what a balancer did in front of apiservers that refuse
// anonymous requests while one of them was stopped.
type anonOffResult struct {
	// ProbeToken tells whether the balancer's health checks had a bearer
	// token.
	ProbeToken bool
	Seconds    float64
	// Total and Bad are the requests started anonOffFrom to anonOffTo
	// after the SIGSTOP, and of those the ones that failed or took longer
	// than slowThreshold.
	Total, Bad int
	// Failed and All are the failed and all requests started during the
	// whole stop; OKRate is the successful ones per second.
	Failed, All int
	OKRate      float64
	// ReadyzShare is the share of 100 ms samples, from the start of the
	// load to the end of the stop, in which the balancer's own /readyz
	// answered 200; -1 for a balancer without one.
	ReadyzShare float64
}

// BadShare is Bad / Total (0 without requests).
func (a *anonOffResult) BadShare() float64 {
	if a.Total == 0 {
		return 0
	}
	return float64(a.Bad) / float64(a.Total)
}

// String renders the figures for the harness's log.
func (a *anonOffResult) String() string { return fmt.Sprintf("%+v", *a) }

// chaosAnonOff: the chaos load through the balancer in front of stand-ins
// with anonymous authentication off, then one stand-in SIGSTOPped for
// anonOffStop. key names the failure samples; the figures go to *out.
func (e *env) chaosAnonOff(ctx context.Context, name, key string, out **anonOffResult, r *chaosResult) error {
	addr := e.targets(name)[0]
	loadFrom := time.Now()
	l := startChaosLoad(ctx, addr)
	var rp *readinessPoller
	if name == nameEP {
		rp = pollReadiness(ctx)
	}
	sleepCtx(ctx, 2*time.Second)
	u := e.upstreams[0]
	from := time.Now()
	err := u.p.signal(syscall.SIGSTOP)
	sleepCtx(ctx, anonOffStop)
	to := time.Now()
	_ = u.p.signal(syscall.SIGCONT)
	evs := l.stop()
	a := &anonOffResult{ProbeToken: key == "anonoff-token", Seconds: anonOffStop.Seconds(), ReadyzShare: -1}
	if rp != nil {
		a.ReadyzShare, _ = rp.stop(loadFrom, to)
	}
	a.All, a.Failed, _ = window(r, key, evs, from, to)
	a.Total, _, _ = window(nil, "", evs, from.Add(anonOffFrom), from.Add(anonOffTo))
	a.Bad = badIn(evs, from.Add(anonOffFrom), from.Add(anonOffTo))
	a.OKRate = float64(a.All-a.Failed) / to.Sub(from).Seconds()
	*out = a
	return err
}

// badIn counts the requests started in [from, to) that failed or took
// longer than slowThreshold (a slow failure counts once).
func badIn(evs []chaosEvent, from, to time.Time) int {
	n := 0
	for _, e := range evs {
		if e.at.Before(from) || !e.at.Before(to) {
			continue
		}
		if e.failed || e.lat > slowThreshold {
			n++
		}
	}
	return n
}

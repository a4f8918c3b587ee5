package readiness

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
)

// DefaultStaleAfter is how long a node trusts the shared verdicts after
// the last update it received: three heartbeats.
const DefaultStaleAfter = 30 * time.Second

// WatcherOptions configure a Watcher. Client, Namespace and Name are
// required.
type WatcherOptions struct {
	Client     kubernetes.Interface
	Namespace  string
	Name       string        // ConfigMap name
	StaleAfter time.Duration // default 30 s: no update received for this long = no shared verdict
	Now        func() time.Time
	Logger     *slog.Logger
	OnChange   func() // called (outside locks) when any verdict changes or freshness changes
}

// Watcher follows the shared readiness ConfigMap for one node. It watches
// that one ConfigMap only (a field selector on its name, so RBAC can grant
// it by resourceNames) and never produces an address: Lookup only answers
// for addresses the caller already has. Run owns the watch and the
// freshness timer; Lookup may be called from any goroutine.
type Watcher struct {
	o WatcherOptions

	mu   sync.Mutex
	doc  *Document // nil: no valid document
	rv   string    // resourceVersion of the last version seen ("" = none)
	recv time.Time // local time the last update was received (zero = none yet)
	// view is what OnChange was last called for: the verdicts, nil when
	// not fresh.
	view map[string]Verdict
	// logged states, so that a lasting condition is logged once.
	missingLogged, deniedLogged bool

	malformed atomic.Uint64
}

// NewWatcher returns a Watcher; nothing runs until Run.
func NewWatcher(o WatcherOptions) *Watcher {
	if o.StaleAfter <= 0 {
		o.StaleAfter = DefaultStaleAfter
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	o.Logger = o.Logger.With("configmap", o.Namespace+"/"+o.Name)
	return &Watcher{o: o}
}

// Lookup returns the shared verdict for addr ("host:port", as in the EndpointSlice) and whether a fresh one exists.
func (w *Watcher) Lookup(addr string) (Verdict, bool) {
	if c, err := canonical(addr); err == nil {
		addr = c
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.freshLocked() {
		return Verdict{}, false
	}
	e, ok := w.doc.APIServers[addr]
	if !ok {
		return Verdict{}, false
	}
	return e.Verdict(), true
}

// Fresh reports whether a valid document was received within StaleAfter.
func (w *Watcher) Fresh() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.freshLocked()
}

// Malformed is how many versions of the ConfigMap could not be used.
func (w *Watcher) Malformed() uint64 { return w.malformed.Load() }

func (w *Watcher) freshLocked() bool {
	return w.doc != nil && !w.recv.IsZero() && w.o.Now().Sub(w.recv) <= w.o.StaleAfter
}

// viewLocked is the verdicts a caller would see now.
func (w *Watcher) viewLocked() map[string]Verdict {
	if !w.freshLocked() {
		return nil
	}
	v := make(map[string]Verdict, len(w.doc.APIServers))
	for a, e := range w.doc.APIServers {
		v[a] = e.Verdict()
	}
	return v
}

// notify calls OnChange if what Lookup answers changed since the last call.
func (w *Watcher) notify() {
	w.mu.Lock()
	v := w.viewLocked()
	changed := (v == nil) != (w.view == nil) || !maps.Equal(v, w.view)
	w.view = v
	w.mu.Unlock()
	if changed && w.o.OnChange != nil {
		w.o.OnChange()
	}
}

// Run watches the ConfigMap until ctx is done and returns nil then, or an
// error for invalid options. Failures to list or watch are retried with
// backoff; meanwhile the verdicts age and turn stale.
func (w *Watcher) Run(ctx context.Context) error {
	if w.o.Client == nil || w.o.Namespace == "" || w.o.Name == "" {
		return errors.New("readiness watcher: client, namespace and name are required")
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() { w.ageLoop(ctx) })
	attempt := 0
	for ctx.Err() == nil {
		err := w.listAndWatch(ctx, &attempt)
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, errRelist) {
			continue
		}
		d := backoff(attempt)
		attempt++
		if apierrors.IsForbidden(err) || apierrors.IsUnauthorized(err) {
			w.mu.Lock()
			first := !w.deniedLogged
			w.deniedLogged = true
			w.mu.Unlock()
			if first {
				w.o.Logger.Warn("not allowed to read the shared readiness ConfigMap; the node uses its own checks", "error", err)
			}
		} else if err != nil {
			w.o.Logger.Info("shared readiness watch failed; retrying", "error", err, "retry_in", d.Round(time.Millisecond).String())
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
	return nil
}

// ageLoop turns the verdicts stale (and tells OnChange) when no update
// comes for StaleAfter.
func (w *Watcher) ageLoop(ctx context.Context) {
	every := min(max(w.o.StaleAfter/10, 10*time.Millisecond), time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			w.notify()
		}
	}
}

// errRelist asks for a new list (the watch's resource version expired).
var errRelist = errors.New("resource version expired")

// listTimeout bounds one list request.
const listTimeout = 30 * time.Second

// listAndWatch lists the ConfigMap by name, then watches it from the
// list's resource version until the watch fails. It resets *attempt only
// after a watch that delivered events or lasted, so that a list that
// works followed by watches that end at once still backs off further
// each time.
func (w *Watcher) listAndWatch(ctx context.Context, attempt *int) error {
	api := w.o.Client.CoreV1().ConfigMaps(w.o.Namespace)
	sel := fields.OneTermEqualSelector("metadata.name", w.o.Name).String()
	lctx, cancel := context.WithTimeout(ctx, listTimeout)
	// ResourceVersion "0": served from the apiserver's watch cache.
	list, err := api.List(lctx, metav1.ListOptions{FieldSelector: sel, ResourceVersion: "0"})
	cancel()
	if err != nil {
		return fmt.Errorf("list ConfigMap %s/%s: %w", w.o.Namespace, w.o.Name, err)
	}
	w.mu.Lock()
	if w.deniedLogged {
		w.deniedLogged = false
		w.o.Logger.Info("reading the shared readiness ConfigMap again")
	}
	w.mu.Unlock()
	var found *corev1.ConfigMap
	for i := range list.Items {
		if list.Items[i].Name == w.o.Name {
			found = &list.Items[i]
		}
	}
	if found == nil {
		w.gone()
	} else {
		w.apply(found, true)
	}
	rv := list.ResourceVersion
	for {
		//nolint:gosec // spreading watch renewals needs no cryptographic randomness.
		timeout := int64(300 + rand.IntN(300))
		wi, err := api.Watch(ctx, metav1.ListOptions{
			FieldSelector: sel, ResourceVersion: rv, AllowWatchBookmarks: true, TimeoutSeconds: &timeout,
		})
		if err != nil {
			if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
				return errRelist
			}
			return fmt.Errorf("watch ConfigMap %s/%s: %w", w.o.Namespace, w.o.Name, err)
		}
		started := w.o.Now()
		next, events, err := w.consume(ctx, wi)
		wi.Stop()
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return nil
		}
		if events == 0 && w.o.Now().Sub(started) < minWatchLife {
			// Ended at once without a word (an apiserver going away): list
			// again after the backoff instead of watching again at once.
			return errClosedEarly
		}
		*attempt = 0 // a watch that worked: the next failure backs off from the start
		if next != "" {
			rv = next
		}
	}
}

// minWatchLife is how long a watch that delivers nothing must last to be
// renewed at once; one that ends sooner goes through the backoff.
const minWatchLife = time.Second

// errClosedEarly reports a watch that ended at once without any event.
var errClosedEarly = errors.New("watch closed at once without events")

// consume handles the events of one watch and returns the last resource
// version seen and the number of events.
func (w *Watcher) consume(ctx context.Context, wi watch.Interface) (rv string, events int, err error) {
	for {
		select {
		case <-ctx.Done():
			return rv, events, nil
		case ev, ok := <-wi.ResultChan():
			if !ok {
				return rv, events, nil
			}
			events++
			switch ev.Type {
			case watch.Error:
				err := apierrors.FromObject(ev.Object)
				if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
					return rv, events, errRelist
				}
				return rv, events, fmt.Errorf("watch ConfigMap %s/%s: %w", w.o.Namespace, w.o.Name, err)
			case watch.Bookmark:
				if cm, ok := ev.Object.(*corev1.ConfigMap); ok {
					rv = cm.ResourceVersion
				}
			case watch.Added, watch.Modified:
				if cm, ok := ev.Object.(*corev1.ConfigMap); ok && cm.Name == w.o.Name {
					rv = cm.ResourceVersion
					w.apply(cm, false)
				}
			case watch.Deleted:
				if cm, ok := ev.Object.(*corev1.ConfigMap); ok && cm.Name == w.o.Name {
					rv = cm.ResourceVersion
					w.gone()
				}
			}
		}
	}
}

// apply takes a version of the ConfigMap. A version already seen changes
// nothing. The first version a Watcher lists is kept but not fresh: it may
// have been written long ago by a publisher that is gone, and its age is
// known only from the publisher's clock, so the verdicts count from the
// next update received.
func (w *Watcher) apply(cm *corev1.ConfigMap, listed bool) {
	w.mu.Lock()
	if cm.ResourceVersion != "" && cm.ResourceVersion == w.rv {
		w.mu.Unlock()
		return
	}
	first := listed && w.rv == ""
	w.rv = cm.ResourceVersion
	w.missingLogged = false
	d, err := Decode([]byte(cm.Data[DataKey]))
	if err != nil {
		w.doc = nil
		w.malformed.Add(1)
		w.mu.Unlock()
		w.o.Logger.Warn("shared readiness ConfigMap unusable; the node uses its own checks",
			"resource_version", cm.ResourceVersion, "error", err)
		w.notify()
		return
	}
	w.doc = &d
	if first {
		w.recv = time.Time{}
	} else {
		w.recv = w.o.Now()
	}
	w.mu.Unlock()
	w.notify()
}

// gone records that the ConfigMap does not exist.
func (w *Watcher) gone() {
	w.mu.Lock()
	w.doc, w.rv = nil, ""
	first := !w.missingLogged
	w.missingLogged = true
	w.mu.Unlock()
	if first {
		w.o.Logger.Info("no shared readiness ConfigMap; the node uses its own checks")
	}
	w.notify()
}

// backoff returns the wait before retry number attempt (0-based): 0.5 s
// doubling to 30 s, jittered down to half.
func backoff(attempt int) time.Duration {
	d := 500 * time.Millisecond
	for i := 0; i < attempt && d < 30*time.Second; i++ {
		d *= 2
	}
	d = min(d, 30*time.Second)
	half := d / 2
	//nolint:gosec // jitter needs no cryptographic randomness.
	return half + rand.N(half+1)
}

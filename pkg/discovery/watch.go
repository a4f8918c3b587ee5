package discovery

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
)

// errRelist asks the watch loop to list again at once (the watch's resource
// version expired).
var errRelist = errors.New("resource version expired")

// listTimeout bounds one list request.
const listTimeout = 30 * time.Second

// backoffPolicy is a capped exponential backoff with jitter.
type backoffPolicy struct {
	base, max time.Duration
}

var defaultBackoff = backoffPolicy{base: 500 * time.Millisecond, max: 15 * time.Second}

// delay returns the wait before retry number attempt (0-based): the capped
// exponential value, jittered down to as little as half of it.
func (b backoffPolicy) delay(attempt int) time.Duration {
	d := b.base
	for i := 0; i < attempt && d < b.max; i++ {
		d *= 2
	}
	d = min(d, b.max)
	half := d / 2
	//nolint:gosec // jitter needs no cryptographic randomness.
	return half + rand.N(half+1)
}

// labelSelector selects the slices of the watched service.
func (m *Manager) labelSelector() string {
	return discoveryv1.LabelServiceName + "=" + m.opts.Service
}

// fieldSelector selects, among them, the one slice the apiservers write:
// it bears the service's name (kubernetes), while anyone allowed to create
// EndpointSlices in the namespace can add another with the same label. It
// also lets RBAC grant access to that slice alone (resourceNames).
func (m *Manager) fieldSelector() string {
	return "metadata.name=" + m.opts.Service
}

// watchLoop lists and watches the EndpointSlices until ctx is done, sending
// what it learns to out.
func (m *Manager) watchLoop(ctx context.Context, out chan<- watchMsg) {
	send := func(msg watchMsg) bool {
		select {
		case out <- msg:
			return true
		case <-ctx.Done():
			return false
		}
	}
	var client kubernetes.Interface
	attempt, early := 0, 0
	for ctx.Err() == nil {
		if client == nil {
			c, closeIdle, err := m.newClient()
			if err != nil {
				err = fmt.Errorf("build API client: %w", err)
				m.log.Warn("discovery cannot build its API client; retrying", "error", err)
				if !send(watchMsg{kind: msgError, err: err}) {
					return
				}
				if !sleep(ctx, m.backoff.delay(attempt)) {
					return
				}
				attempt++
				continue
			}
			client = c
			defer closeIdle()
		}
		err := m.listAndWatch(ctx, client, send, &attempt, &early)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errRelist) {
			m.log.Info("discovery watch expired; listing again")
			continue
		}
		if errors.Is(err, errClosedEarly) {
			// List again at once; if that keeps happening, back off.
			early++
			if early < 2 {
				m.log.Debug("discovery watch closed at once; listing again")
				continue
			}
			err = fmt.Errorf("watch EndpointSlices in namespace %q: %w (%d times)", m.opts.Namespace, err, early)
		}
		if err != nil {
			d := m.backoff.delay(attempt)
			m.log.Warn("discovery failed; retrying", "error", err, "retry_in", d.Round(time.Millisecond).String())
			if !send(watchMsg{kind: msgError, err: err}) {
				return
			}
			if !sleep(ctx, d) {
				return
			}
			attempt++
		}
	}
}

// sliceAPI lists and watches the EndpointSlices of one namespace.
type sliceAPI interface {
	List(ctx context.Context, opts metav1.ListOptions) (*discoveryv1.EndpointSliceList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
}

// restSlices is sliceAPI on the REST client, without client-go's own
// retries (up to ten, a second apart, on connection errors): they would
// hide a lost API for ten seconds per request and bypass the backoff here.
type restSlices struct {
	rc *rest.RESTClient
	ns string
}

func (r restSlices) List(ctx context.Context, opts metav1.ListOptions) (*discoveryv1.EndpointSliceList, error) {
	out := &discoveryv1.EndpointSliceList{}
	err := r.rc.Get().Namespace(r.ns).Resource("endpointslices").
		VersionedParams(&opts, scheme.ParameterCodec).MaxRetries(0).Do(ctx).Into(out)
	if err != nil {
		return nil, err
	}
	return out, nil
}

func (r restSlices) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	req := r.rc.Get().Namespace(r.ns).Resource("endpointslices").
		VersionedParams(&opts, scheme.ParameterCodec).MaxRetries(0)
	if opts.TimeoutSeconds != nil {
		req = req.Timeout(time.Duration(*opts.TimeoutSeconds) * time.Second)
	}
	return req.Watch(ctx)
}

// sliceClient returns the sliceAPI of client: the REST client when there is one
// (a real clientset), else the typed client (a fake one in tests).
func (m *Manager) sliceClient(client kubernetes.Interface) sliceAPI {
	if rc, ok := client.DiscoveryV1().RESTClient().(*rest.RESTClient); ok && rc != nil {
		return restSlices{rc: rc, ns: m.opts.Namespace}
	}
	return client.DiscoveryV1().EndpointSlices(m.opts.Namespace)
}

// errClosedEarly reports a watch that ended at once without any event: the
// path to the apiserver is probably gone, so the loop lists again (which
// tells why) instead of watching again.
var errClosedEarly = errors.New("watch closed at once without events")

// listAndWatch lists the slices, then watches from the list's resource
// version until the watch fails. It resets *attempt after a good list and
// *early after a watch that delivered events or lasted.
func (m *Manager) listAndWatch(ctx context.Context, client kubernetes.Interface, send func(watchMsg) bool, attempt, early *int) error {
	api := m.sliceClient(client)
	sel, fields := m.labelSelector(), m.fieldSelector()
	lctx, cancel := context.WithTimeout(ctx, listTimeout)
	list, err := api.List(lctx, metav1.ListOptions{LabelSelector: sel, FieldSelector: fields})
	cancel()
	if err != nil {
		return fmt.Errorf("list EndpointSlices in namespace %q with %s,%s: %w", m.opts.Namespace, sel, fields, err)
	}
	store := make(map[string]*discoveryv1.EndpointSlice, len(list.Items))
	for i := range list.Items {
		if m.ours(&list.Items[i]) {
			store[list.Items[i].Name] = &list.Items[i]
		}
	}
	if !send(watchMsg{kind: msgSnapshot, endpoints: m.endpointsOf(store), listed: true}) {
		return nil
	}
	*attempt = 0
	rv := list.ResourceVersion
	for {
		//nolint:gosec // spreading watch renewals needs no cryptographic randomness.
		timeout := int64(300 + rand.IntN(300))
		w, err := api.Watch(ctx, metav1.ListOptions{
			LabelSelector:       sel,
			FieldSelector:       fields,
			ResourceVersion:     rv,
			AllowWatchBookmarks: true,
			TimeoutSeconds:      &timeout,
		})
		if err != nil {
			if apierrors.IsResourceExpired(err) || apierrors.IsGone(err) {
				return errRelist
			}
			return fmt.Errorf("watch EndpointSlices in namespace %q from resource version %s: %w", m.opts.Namespace, rv, err)
		}
		started := time.Now()
		var events int
		rv, events, err = m.consume(ctx, w, store, rv, send)
		w.Stop()
		if err != nil || ctx.Err() != nil {
			return err
		}
		if events == 0 && time.Since(started) < time.Second {
			return errClosedEarly
		}
		*early = 0
		m.log.Debug("discovery watch ended; watching again", "resource_version", rv)
		if !send(watchMsg{kind: msgRestart}) {
			return nil
		}
	}
}

// consume reads one watch until it closes. It returns the resource version to
// resume from and how many events it saw.
func (m *Manager) consume(ctx context.Context, w watch.Interface, store map[string]*discoveryv1.EndpointSlice, rv string, send func(watchMsg) bool) (string, int, error) {
	events := 0
	for {
		var ev watch.Event
		var ok bool
		select {
		case <-ctx.Done():
			return rv, events, nil
		case ev, ok = <-w.ResultChan():
		}
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
			return rv, events, fmt.Errorf("watch EndpointSlices in namespace %q: %w", m.opts.Namespace, err)
		case watch.Bookmark:
			if acc, err := meta.Accessor(ev.Object); err == nil && acc.GetResourceVersion() != "" {
				rv = acc.GetResourceVersion()
			}
			continue
		case watch.Added, watch.Modified, watch.Deleted:
		default:
			continue
		}
		s, isSlice := ev.Object.(*discoveryv1.EndpointSlice)
		if !isSlice {
			continue
		}
		if s.ResourceVersion != "" {
			rv = s.ResourceVersion
		}
		if !m.ours(s) {
			// Not ours (a relabelled slice): forget it if we had it.
			if _, had := store[s.Name]; !had {
				continue
			}
			delete(store, s.Name)
		} else if ev.Type == watch.Deleted {
			delete(store, s.Name)
		} else {
			store[s.Name] = s
		}
		if !send(watchMsg{kind: msgSnapshot, endpoints: m.endpointsOf(store)}) {
			return rv, events, nil
		}
	}
}

// ours reports whether s is the slice the apiservers write for the
// watched service (the selectors already ask for it alone; this holds
// whatever the server sends).
func (m *Manager) ours(s *discoveryv1.EndpointSlice) bool {
	return s.Name == m.opts.Service && s.Labels[discoveryv1.LabelServiceName] == m.opts.Service
}

// endpointsOf merges the ready endpoints of all slices into a sorted,
// de-duplicated list without the addresses no apiserver can have, capped
// at Options.MaxEndpoints.
func (m *Manager) endpointsOf(store map[string]*discoveryv1.EndpointSlice) []string {
	var out []string
	for _, s := range store {
		eps, err := SliceEndpoints(s)
		if err != nil {
			m.log.Debug("skipping EndpointSlice", "name", s.Name, "error", err)
		}
		out = append(out, eps...)
	}
	return m.screen.screen(out, "EndpointSlice")
}

// SliceEndpoints returns host:port for every address of every endpoint of s
// that is not marked not-ready. The port is the slice's port named "https",
// or its only port. Slices of address type FQDN are not used.
func SliceEndpoints(s *discoveryv1.EndpointSlice) ([]string, error) {
	if s.AddressType != discoveryv1.AddressTypeIPv4 && s.AddressType != discoveryv1.AddressTypeIPv6 {
		return nil, fmt.Errorf("address type %q is not IPv4 or IPv6", s.AddressType)
	}
	port, err := slicePort(s.Ports)
	if err != nil {
		return nil, err
	}
	p := strconv.Itoa(int(port))
	var out []string
	var errs []error
	for _, ep := range s.Endpoints {
		if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
			continue
		}
		for _, a := range ep.Addresses {
			ip, err := netip.ParseAddr(a)
			if err != nil {
				errs = append(errs, fmt.Errorf("address %q: %w", a, err))
				continue
			}
			ip = ip.Unmap()
			if (s.AddressType == discoveryv1.AddressTypeIPv4) != ip.Is4() {
				errs = append(errs, fmt.Errorf("address %q does not match address type %s", a, s.AddressType))
				continue
			}
			out = append(out, net.JoinHostPort(ip.WithZone("").String(), p))
		}
	}
	return out, errors.Join(errs...)
}

// slicePort picks the port named "https", else the only port.
func slicePort(ports []discoveryv1.EndpointPort) (int32, error) {
	valid := slices.DeleteFunc(slices.Clone(ports), func(p discoveryv1.EndpointPort) bool {
		return p.Port == nil || *p.Port <= 0 || *p.Port > 65535
	})
	for _, p := range valid {
		if p.Name != nil && *p.Name == "https" {
			return *p.Port, nil
		}
	}
	if len(valid) == 1 {
		return *valid[0].Port, nil
	}
	return 0, fmt.Errorf("no port named \"https\" among %d usable ports", len(valid))
}

// sleep waits for d or until ctx is done; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

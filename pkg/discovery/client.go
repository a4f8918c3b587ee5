package discovery

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// serviceAccountDir holds the in-cluster credentials.
const serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// userAgent names discovery in the apiserver's logs and audit.
const userAgent = "extractedprism-discovery"

// buildClient reads the credentials and builds the API client. The returned
// function closes the client's idle connections.
func (m *Manager) buildClient() (kubernetes.Interface, func(), error) {
	cfg, err := m.restConfig()
	if err != nil {
		return nil, nil, err
	}
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("HTTP client for %s: %w", cfg.Host, err)
	}
	c, err := kubernetes.NewForConfigAndClient(cfg, hc)
	if err != nil {
		return nil, nil, fmt.Errorf("API client for %s: %w", cfg.Host, err)
	}
	return c, func() { utilnet.CloseIdleConnectionsFor(hc.Transport) }, nil
}

// restConfig returns the client configuration: the kubeconfig's, or the
// in-cluster service account's, pointed at our own listener with ViaLocal.
func (m *Manager) restConfig() (*rest.Config, error) {
	var cfg *rest.Config
	switch {
	case m.opts.Kubeconfig != "":
		c, err := clientcmd.BuildConfigFromFlags("", m.opts.Kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("discovery.kubeconfig %q: %w", m.opts.Kubeconfig, err)
		}
		cfg = c
	case m.opts.ViaLocal:
		// In-cluster credentials without KUBERNETES_SERVICE_HOST: the
		// service address is not needed (and may not be routable yet).
		token := filepath.Join(serviceAccountDir, "token")
		if _, err := os.Stat(token); err != nil {
			return nil, fmt.Errorf("in-cluster credentials: %w", err)
		}
		cfg = &rest.Config{
			BearerTokenFile: token,
			TLSClientConfig: rest.TLSClientConfig{CAFile: filepath.Join(serviceAccountDir, "ca.crt")},
		}
	default:
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster credentials: %w", err)
		}
		cfg = c
	}
	if m.opts.ViaLocal {
		cfg.Host = "https://" + localDialAddress(m.opts.LocalAddress)
		switch {
		case m.opts.ServerName != "":
			cfg.ServerName = m.opts.ServerName
		case cfg.ServerName == "":
			cfg.ServerName = DefaultServerName
		}
	}
	cfg.UserAgent = userAgent
	return cfg, nil
}

// localDialAddress turns a listen address into one to dial: an unspecified
// host (0.0.0.0, ::) becomes the loopback address of its family.
func localDialAddress(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen
	}
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsUnspecified() {
		if ip.Is4() {
			host = "127.0.0.1"
		} else {
			host = "::1"
		}
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// Client builds an API client from the same credentials and path as the
// EndpointSlice watch (the kubeconfig, or the in-cluster service account,
// through our own listener with via_local), for other readers of the
// cluster such as the shared readiness watcher. The returned function
// closes the client's idle connections.
func (m *Manager) Client() (kubernetes.Interface, func(), error) {
	return m.buildClient()
}

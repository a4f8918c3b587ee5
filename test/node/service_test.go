package node

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// serviceIP is the ClusterIP of the default/kubernetes service (the first
// address of --service-cluster-ip-range), on the namespace's lo.
const serviceIP = "10.0.0.1"

// serviceVIP stands in for kube-proxy's rule for the default/kubernetes
// service: pods using in-cluster credentials (KUBERNETES_SERVICE_HOST, as
// the readiness publisher does) dial 10.0.0.1:443 and reach a live
// apiserver. It forwards raw TCP and owns every connection it accepted.
type serviceVIP struct {
	ln      net.Listener
	backend func() string // the apiserver to dial next

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// startServiceVIP listens on 10.0.0.1:443 for the whole run.
func (c *cluster) startServiceVIP(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(serviceIP, "443"))
	if err != nil {
		t.Fatalf("service VIP: %v", err)
	}
	v := &serviceVIP{ln: ln, backend: c.liveAPIServer, conns: map[net.Conn]struct{}{}}
	v.wg.Add(1)
	go v.serve()
	t.Cleanup(v.close)
}

func (v *serviceVIP) serve() {
	defer v.wg.Done()
	for {
		conn, err := v.ln.Accept()
		if err != nil {
			return
		}
		v.wg.Add(1)
		go v.forward(conn)
	}
}

// track records conn until untrack; false once the VIP is closed.
func (v *serviceVIP) track(conn net.Conn) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.conns == nil {
		return false
	}
	v.conns[conn] = struct{}{}
	return true
}

func (v *serviceVIP) untrack(conn net.Conn) {
	v.mu.Lock()
	defer v.mu.Unlock()
	delete(v.conns, conn)
}

// forward copies both ways between a pod and an apiserver, passing each
// side's end of stream on as a half close.
func (v *serviceVIP) forward(client net.Conn) {
	defer v.wg.Done()
	defer func() { _ = client.Close() }()
	if !v.track(client) {
		return
	}
	defer v.untrack(client)
	up, err := net.DialTimeout("tcp", v.backend(), 5*time.Second)
	if err != nil {
		return
	}
	defer func() { _ = up.Close() }()
	if !v.track(up) {
		return
	}
	defer v.untrack(up)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go pipe(up, client)
	go pipe(client, up)
	<-done
	<-done
}

// close stops accepting, cuts every forwarded connection and waits for the
// goroutines.
func (v *serviceVIP) close() {
	_ = v.ln.Close()
	v.mu.Lock()
	for conn := range v.conns {
		_ = conn.Close()
	}
	v.conns = nil
	v.mu.Unlock()
	v.wg.Wait()
}

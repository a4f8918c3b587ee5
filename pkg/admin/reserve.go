package admin

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
)

// reserveListener keeps a few spare file descriptors. When Accept fails
// with EMFILE or ENFILE (the proxy has used every descriptor), it gives
// the spares up one at a time and accepts again, so /healthz and /readyz
// still answer and tell the truth while the process is out of
// descriptors. Other goroutines may grab a freed descriptor first, hence
// more than one.
type reserveListener struct {
	net.Listener
	mu     sync.Mutex
	spares []*os.File
}

const spareFDs = 3

func newReserveListener(ln net.Listener) net.Listener {
	r := &reserveListener{Listener: ln}
	r.refill()
	return r
}

func exhausted(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

func (r *reserveListener) Accept() (net.Conn, error) {
	c, err := r.Listener.Accept()
	for err != nil && exhausted(err) && r.release() {
		c, err = r.Listener.Accept()
	}
	r.refill()
	return c, err
}

// release closes one spare and reports whether there was one.
func (r *reserveListener) release() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.spares) == 0 {
		return false
	}
	_ = r.spares[len(r.spares)-1].Close()
	r.spares = r.spares[:len(r.spares)-1]
	return true
}

func (r *reserveListener) refill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.spares) < spareFDs {
		f, err := os.Open(os.DevNull)
		if err != nil {
			return
		}
		r.spares = append(r.spares, f)
	}
}

func (r *reserveListener) Close() error {
	r.mu.Lock()
	for _, f := range r.spares {
		_ = f.Close()
	}
	r.spares = nil
	r.mu.Unlock()
	return r.Listener.Close()
}

package admin

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
)

// reserveListener keeps one spare file descriptor. When Accept fails with
// EMFILE or ENFILE (the proxy has used every descriptor), it gives the
// spare up for one accept, so /healthz and /readyz still answer and can
// tell the truth while the process is out of descriptors.
type reserveListener struct {
	net.Listener
	mu    sync.Mutex
	spare *os.File
}

func newReserveListener(ln net.Listener) net.Listener {
	r := &reserveListener{Listener: ln}
	r.spare, _ = os.Open(os.DevNull)
	return r
}

func (r *reserveListener) Accept() (net.Conn, error) {
	c, err := r.Listener.Accept()
	if err == nil || (!errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE)) {
		r.refill()
		return c, err
	}
	r.mu.Lock()
	if r.spare != nil {
		_ = r.spare.Close()
		r.spare = nil
	}
	r.mu.Unlock()
	c, err = r.Listener.Accept()
	r.refill()
	return c, err
}

func (r *reserveListener) refill() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.spare == nil {
		r.spare, _ = os.Open(os.DevNull)
	}
}

func (r *reserveListener) Close() error {
	r.mu.Lock()
	if r.spare != nil {
		_ = r.spare.Close()
		r.spare = nil
	}
	r.mu.Unlock()
	return r.Listener.Close()
}

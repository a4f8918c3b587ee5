package systemd

import (
	"errors"
	"fmt"
	"net"

	"github.com/coreos/go-systemd/v22/activation"
)

// ActivatedListeners returns the stream listeners handed over by systemd
// socket activation (LISTEN_FDS and LISTEN_PID naming this process), in the
// order of the socket unit's ListenStream= lines, or nil when there are none.
// It unsets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES so that child processes
// do not inherit them. A passed descriptor that is not a listening stream
// socket (a datagram socket, a FIFO, ...) is an error; all passed descriptors
// are closed in that case.
//
// Closing a returned listener closes only this process's copy: the socket
// itself stays open in systemd, which keeps queuing connections until the
// next instance of the service accepts them.
func ActivatedListeners() ([]net.Listener, error) {
	files := activation.Files(true)
	if len(files) == 0 {
		return nil, nil
	}
	listeners := make([]net.Listener, 0, len(files))
	var errs []error
	for _, f := range files {
		l, err := net.FileListener(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("systemd: activated fd %d (%s) is not a stream listener: %w", f.Fd(), f.Name(), err))
		} else {
			listeners = append(listeners, l)
		}
		// net.FileListener dups the descriptor; the original is not needed.
		if err := f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("systemd: close activated fd %s: %w", f.Name(), err))
		}
	}
	if len(errs) > 0 {
		for _, l := range listeners {
			_ = l.Close()
		}
		return nil, errors.Join(errs...)
	}
	return listeners, nil
}

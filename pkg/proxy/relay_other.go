//go:build !linux

package proxy

import (
	"io"
	"net"
	"time"
)

// Where epoll does not exist (development builds on other systems; the
// product runs on Linux only), an established connection is carried by a
// goroutine per direction instead of the event loops of relay_linux.go.

type relay struct{}

func newRelay() (*relay, error) { return &relay{}, nil }

func (r *relay) add(f *flow) { go f.run() }

func (r *relay) stop() {}

type flow struct {
	client, up net.Conn
	clientEOF  bool
	onEnd      func(sent, received int64, err error)
}

func newFlow(client, up any, clientEOF bool, onEnd func(sent, received int64, err error)) (*flow, error) {
	return &flow{client: client.(net.Conn), up: up.(net.Conn), clientEOF: clientEOF, onEnd: onEnd}, nil
}

func (f *flow) run() {
	done := make(chan int64, 1)
	go func() {
		if f.clientEOF {
			done <- 0
			return
		}
		done <- copyHalf(f.up, f.client)
	}()
	received := copyHalf(f.client, f.up)
	sent := <-done
	_ = f.client.Close()
	_ = f.up.Close()
	f.onEnd(sent, received, nil)
}

func (f *flow) kill() {
	_ = f.client.Close()
	_ = f.up.Close()
}

func (f *flow) heard(time.Duration) bool { return false }

// copyHalf copies src to dst; on EOF it half-closes dst, on error it
// closes both so the other direction ends too.
func copyHalf(dst, src net.Conn) int64 {
	n, err := io.Copy(dst, src)
	if err == nil {
		if cw, ok := dst.(closeWriter); ok && cw.CloseWrite() == nil {
			return n
		}
	}
	_ = dst.Close()
	_ = src.Close()
	return n
}

package failure

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
)

type timeoutErr struct{}

func (timeoutErr) Error() string { return "no answer" }
func (timeoutErr) Timeout() bool { return true }

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want Kind
	}{
		{nil, Other},
		{errors.New("tls: bad certificate"), Other},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, Refused},
		{fmt.Errorf("probe /readyz: %w 500", ErrUnready), Unready},
		{context.DeadlineExceeded, Timeout},
		{fmt.Errorf("read: %w", os.ErrDeadlineExceeded), Timeout},
		{&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ETIMEDOUT)}, Timeout},
		{fmt.Errorf("wrapped: %w", timeoutErr{}), Timeout},
		{&net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, Other},
	} {
		if got := Classify(tc.err); got != tc.want {
			t.Errorf("Classify(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

func TestLocalExhaustion(t *testing.T) {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM} {
		if !LocalExhaustion(&net.OpError{Op: "dial", Err: os.NewSyscallError("socket", e)}) {
			t.Errorf("%v is local exhaustion", e)
		}
	}
	if LocalExhaustion(syscall.ECONNREFUSED) {
		t.Error("a refused connect is the upstream's, not local exhaustion")
	}
}

func TestKindNames(t *testing.T) {
	seen := map[string]bool{}
	for _, k := range Kinds {
		if seen[k.String()] {
			t.Fatalf("duplicate name %q", k)
		}
		seen[k.String()] = true
	}
}

package replay

import (
	"bytes"
	"testing"
)

func TestTLSHandshakeOnly(t *testing.T) {
	cases := []struct {
		in   []byte
		want bool
	}{
		{[]byte{22, 3, 1, 0, 2, 1, 1}, true},
		{[]byte{22, 3}, true},
		{[]byte{22, 3, 1, 0, 1, 9, 20, 3, 3, 0, 1, 1}, true},
		{[]byte{22, 3, 1, 0, 1, 9, 23, 3, 3, 0, 1, 1}, false}, // 0-RTT application data
		{[]byte("GET / HTTP/1.1\r\n"), false},
		{[]byte{22, 9, 1}, false},
	}
	for _, c := range cases {
		if got := TLSHandshakeOnly(c.in); got != c.want {
			t.Errorf("TLSHandshakeOnly(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestKeeperKeepsOnlyReplayableBytes(t *testing.T) {
	hello := []byte{22, 3, 1, 0, 2, 1, 1}
	cases := []struct {
		name       string
		limit      int
		reads      [][]byte
		kept       []byte
		replayable bool
		from       int
	}{
		{"nothing yet", 16, nil, nil, true, 0},
		{"a handshake", 16, [][]byte{hello}, hello, true, 7},
		{"a handshake in two reads", 16, [][]byte{hello[:3], hello[3:]}, hello, true, 7},
		{"plain text", 16, [][]byte{[]byte("GET /")}, nil, false, 5},
		{"a handshake then plain text", 16, [][]byte{hello, []byte("x")}, nil, false, 8},
		{"over the limit", 4, [][]byte{hello}, nil, false, 7},
	}
	for _, c := range cases {
		k := NewKeeper(c.limit)
		for _, b := range c.reads {
			k.Keep(b)
		}
		if !bytes.Equal(k.Kept(), c.kept) || k.Replayable() != c.replayable || k.FromClient() != c.from {
			t.Errorf("%s: kept %v replayable %v from %d; want %v %v %d", c.name, k.Kept(), k.Replayable(), k.FromClient(), c.kept, c.replayable, c.from)
		}
	}
}

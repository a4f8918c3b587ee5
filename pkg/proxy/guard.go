package proxy

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
)

// Stranger is a listening socket on the port of one of our reuse-port
// listeners that is not an extractedprism of ours: another UID, or a
// process that does not answer the listener handshake.
type Stranger struct {
	// Listener is the name the Guard knows our listener by ("listen",
	// "admin").
	Listener string
	// Address is the address the stranger's socket is bound to.
	Address string
	// Inode is its socket's inode, UID its owner.
	Inode uint64
	UID   uint32
	// PID and Exe name the process that holds it, when it is visible from
	// here (same PID namespace); PID 0 when it is not.
	PID int
	Exe string
}

func (s Stranger) String() string {
	holder := "holder not visible from here"
	if s.PID != 0 {
		holder = fmt.Sprintf("pid %d (%s)", s.PID, s.Exe)
	}
	return fmt.Sprintf("%s: socket inode %d of uid %d on %s, %s", s.Listener, s.Inode, s.UID, s.Address, holder)
}

// GuardOptions configure a Guard.
type GuardOptions struct {
	// Listeners returns the listeners to watch, by name. Only listeners
	// that Listen opened with reuse-port are checked: nobody else can
	// bind the port of the others.
	Listeners func() map[string]net.Listener
	// Interval is the time between two checks (default 1s).
	Interval time.Duration
	// OnChange is called with a listener's name and its number of
	// strangers at the first check and whenever the number changes.
	OnChange func(listener string, strangers int)
	// Logger logs strangers at ERROR when they appear, and when they go.
	Logger *slog.Logger
}

// Guard keeps the SO_REUSEPORT groups of the balancer's listeners its own:
// at every check it lists the other sockets on each port and sets the
// group's steering (new connections go to the newest socket only when
// all of them are ours), and it reports every stranger. It does not close
// its listener when it finds one: the stranger would then hold the port
// alone, and a new socket of ours would join the same group again. The
// kernel goes on giving the stranger its share of new connections until
// the stranger is stopped; the report (log, OnChange, Strangers) is for
// whoever can stop it.
type Guard struct {
	o GuardOptions

	mu        sync.Mutex
	strangers map[string][]Stranger // by listener name
	reported  map[string]bool       // listener names OnChange has seen
}

// NewGuard returns a Guard; Run starts its checks.
func NewGuard(o GuardOptions) *Guard {
	if o.Interval <= 0 {
		o.Interval = time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Listeners == nil {
		o.Listeners = func() map[string]net.Listener { return nil }
	}
	return &Guard{o: o, strangers: map[string][]Stranger{}, reported: map[string]bool{}}
}

// Run checks at once and then every Interval until ctx is done.
func (g *Guard) Run(ctx context.Context) error {
	t := time.NewTicker(g.o.Interval)
	defer t.Stop()
	for {
		g.Check()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Check checks every listener once.
func (g *Guard) Check() {
	lns := g.o.Listeners()
	names := make([]string, 0, len(lns))
	for name := range lns {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		ln := lns[name]
		if ln == nil {
			continue
		}
		found, guarded, err := checkGroup(ln)
		if err != nil {
			g.o.Logger.Warn("cannot check the other sockets on a listener's port", "listener", name,
				"address", ln.Addr().String(), "err", err)
			if found == nil {
				continue // nothing known: keep the last verdict
			}
		}
		if !guarded {
			found = nil
		}
		g.update(name, found)
	}
}

// update records the strangers of one listener and reports changes.
func (g *Guard) update(name string, found []member) {
	g.mu.Lock()
	prev := g.strangers[name]
	known := make(map[uint64]Stranger, len(prev))
	for _, s := range prev {
		known[s.Inode] = s
	}
	g.mu.Unlock()

	now := make([]Stranger, 0, len(found))
	for _, m := range found {
		if s, ok := known[m.inode]; ok {
			now = append(now, s)
			delete(known, m.inode)
			continue
		}
		pid, exe := holderOf(m.inode)
		s := Stranger{Listener: name, Address: m.addr, Inode: m.inode, UID: m.uid, PID: pid, Exe: exe}
		now = append(now, s)
		g.o.Logger.Error("a process that is not this balancer listens on its port and gets a share of its new connections; "+
			"steering to the newest socket is off until it is gone; stop that process",
			"listener", name, "address", s.Address, "inode", s.Inode, "uid", s.UID, "pid", s.PID, "exe", s.Exe)
	}
	for _, s := range known {
		g.o.Logger.Info("the stranger on the listener's port is gone", "listener", name, "inode", s.Inode, "uid", s.UID, "pid", s.PID)
	}

	g.mu.Lock()
	changed := !g.reported[name] || len(now) != len(prev)
	g.reported[name] = true
	if len(now) == 0 {
		delete(g.strangers, name)
	} else {
		g.strangers[name] = now
	}
	g.mu.Unlock()
	if changed && g.o.OnChange != nil {
		g.o.OnChange(name, len(now))
	}
}

// Strangers returns the strangers found by the last check, by listener
// name then inode.
func (g *Guard) Strangers() []Stranger {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []Stranger
	for _, ss := range g.strangers {
		out = append(out, ss...)
	}
	slices.SortFunc(out, func(a, b Stranger) int {
		if c := strings.Compare(a.Listener, b.Listener); c != 0 {
			return c
		}
		return cmp.Compare(a.Inode, b.Inode)
	})
	return out
}

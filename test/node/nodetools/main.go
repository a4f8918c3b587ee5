// Command nodetools is the one binary of the test's own container image
// (nothing is pulled from a registry): the pod sandbox's pause process and
// the workload that the node tests read logs from and exec into.
//
//	nodetools            wait for SIGTERM/SIGINT, reaping children (pause)
//	nodetools tick       print "tick N" every 200 ms until SIGTERM
//	nodetools echo ARGS  print ARGS and exit
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	mode := ""
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	switch mode {
	case "", "pause":
		pause()
	case "tick":
		tick()
	case "echo":
		fmt.Println(strings.Join(os.Args[2:], " "))
	default:
		fmt.Fprintf(os.Stderr, "nodetools: unknown mode %q (pause, tick, echo)\n", mode)
		os.Exit(2)
	}
}

// pause blocks until SIGTERM or SIGINT and reaps exited children meanwhile,
// as a pod sandbox's process must.
func pause() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

// tick prints a numbered line every 200 ms until SIGTERM or SIGINT.
func tick() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for n := 1; ; n++ {
		select {
		case <-sigs:
			fmt.Println("tick: stopping")
			return
		case <-t.C:
			fmt.Printf("tick %d\n", n)
		}
	}
}

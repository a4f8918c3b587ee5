// Package sys holds the system calls of the proxy's data path (Linux
// only): reads, writes, epoll, shutdown and socket options on bare
// descriptors, and taking a socket out of Go's poller. It knows nothing
// of connections, upstreams or policy; the relay, connect and proxy
// packages use it.
package sys

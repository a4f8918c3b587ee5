// Package connect starts TCP connects without blocking (Linux only): a
// non-blocking socket whose connect is under way, for the relay's event
// loops to wait on. It knows nothing of upstream health or retries; the
// proxy decides what a failed connect means.
package connect

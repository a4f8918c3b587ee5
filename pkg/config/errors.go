package config

import (
	"errors"
	"fmt"
	"strconv"
)

// FieldError is one problem with one configuration value. Load and
// Validate return every problem they find as an errors.Join of
// *FieldError; use FieldErrors to get them back as a slice.
type FieldError struct {
	// Path is the key, e.g. "probe.interval" or "endpoints[1]".
	Path string
	// Value is the offending value (nil when there is none, e.g. a missing key).
	Value any
	// Msg says what is wrong; it quotes the value where that helps.
	Msg string
	// File, Line and Column locate the value in the YAML file, when it came from there.
	File   string
	Line   int
	Column int
	// Source names where a value came from when it is not the file:
	// "EP_BIND_PORT" or "--bind-port".
	Source string

	// related lists other keys a cross-field rule depends on; Load drops
	// the problem when one of them could not be read.
	related []string
	// notConfigured marks the problem of a configuration that names no
	// API server at all (see NotConfigured).
	notConfigured bool
}

// NotConfigured reports whether err (from Load or Validate) says that the
// configuration names no API server and cannot discover one: the state of
// a freshly installed package whose configuration file has not been
// edited yet, as opposed to a configuration with a wrong value in it.
func NotConfigured(err error) bool {
	for _, fe := range FieldErrors(err) {
		if fe.notConfigured {
			return true
		}
	}
	return false
}

// Error renders "file:line:col: path: msg" or "path: msg (from EP_X)".
func (e *FieldError) Error() string {
	s := e.Msg
	if e.Path != "" {
		s = e.Path + ": " + s
	}
	switch {
	case e.File != "" && e.Line > 0:
		s = e.File + ":" + strconv.Itoa(e.Line) + ":" + strconv.Itoa(e.Column) + ": " + s
	case e.File != "":
		s = e.File + ": " + s
	case e.Source != "":
		s += " (from " + e.Source + ")"
	}
	return s
}

// FieldErrors returns every *FieldError joined into err (nil if none).
func FieldErrors(err error) []*FieldError {
	var out []*FieldError
	var walk func(error)
	walk = func(err error) {
		if err == nil {
			return
		}
		if fe, ok := err.(*FieldError); ok { //nolint:errorlint // walking the tree by hand
			out = append(out, fe)
			return
		}
		switch u := err.(type) { //nolint:errorlint // walking the tree by hand
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		}
	}
	walk(err)
	return out
}

// errorList collects problems in order.
type errorList struct {
	errs []error
}

// newFieldError builds a problem at path.
func newFieldError(path string, value any, format string, args ...any) *FieldError {
	return &FieldError{Path: path, Value: value, Msg: fmt.Sprintf(format, args...)}
}

// push records a problem.
func (l *errorList) push(fe *FieldError) {
	l.errs = append(l.errs, fe)
}

// add records a problem at path.
func (l *errorList) add(path string, value any, format string, args ...any) {
	l.push(newFieldError(path, value, format, args...))
}

// addRelated records a problem of a rule that also depends on the keys
// in related.
func (l *errorList) addRelated(related []string, path string, value any, format string, args ...any) {
	fe := newFieldError(path, value, format, args...)
	fe.related = related
	l.push(fe)
}

// err returns the joined problems, or nil.
func (l *errorList) err() error {
	return errors.Join(l.errs...)
}

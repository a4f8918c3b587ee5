package cluster

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// EtcdURL is where etcd serves its clients, inside the test namespace;
// HostEtcdURL is where the hosts' apiservers reach it (Options.Hosts).
const (
	EtcdURL     = "http://127.0.0.1:2379"
	HostEtcdURL = "http://" + GatewayIPv4 + ":2379"
)

// StartEtcd starts etcd (one member, named after the run, its data in
// /dev/shm where that exists) with the extra flags and waits up to a
// minute for it to be healthy. A restart keeps the data directory of the
// first start.
func (e *Env) StartEtcd(extra ...string) error {
	if e.EtcdData == "" {
		data, err := os.MkdirTemp(ShmOr(e.Dir), "etcd-")
		if err != nil {
			return fmt.Errorf("etcd data directory: %w", err)
		}
		e.EtcdData = data
	}
	listen := EtcdURL
	if e.hosts {
		listen += "," + HostEtcdURL
	}
	args := append([]string{
		"--name=" + e.Name, "--data-dir=" + e.EtcdData,
		"--listen-client-urls=" + listen, "--advertise-client-urls=" + EtcdURL,
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=" + e.Name + "=http://127.0.0.1:2380", "--log-level=warn",
	}, extra...)
	p, err := e.Start("etcd", e.Bins.Etcd, args...)
	if err != nil {
		return err
	}
	e.Etcd = p
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for {
		resp, err := client.Get(EtcdURL + "/health")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK && bytes.Contains(body, []byte(`"health":"true"`)) {
				return nil
			}
		}
		if !p.Running() {
			return fmt.Errorf("etcd exited: %v\n%s", p.Err, p.Tail(20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcd not healthy within a minute:\n%s", p.Tail(20))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// RemoveEtcdData removes etcd's data directory (it lives outside the work
// directory).
func (e *Env) RemoveEtcdData() {
	if e.EtcdData != "" {
		_ = os.RemoveAll(e.EtcdData)
	}
}

// ShmOr returns /dev/shm when it exists (etcd's fsyncs are cheap there),
// else dir.
func ShmOr(dir string) string {
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		return "/dev/shm"
	}
	return dir
}

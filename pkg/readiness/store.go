package readiness

import (
	"context"
	"errors"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// configMapLabels mark the ConfigMap as the shared readiness.
var configMapLabels = map[string]string{
	"app.kubernetes.io/name":      "extractedprism",
	"app.kubernetes.io/component": "readiness",
}

// store writes the Document into the ConfigMap with optimistic
// concurrency: every update carries the resourceVersion last read or
// written, and a conflict (another writer came in between) reads the
// ConfigMap again before retrying. It owns the Sequence: each write is one
// more than any sequence it has read or written, so the sequence keeps
// growing across publishers. One store belongs to one term of leadership.
type store struct {
	client    kubernetes.Interface
	namespace string
	name      string

	cm  *corev1.ConfigMap // last read or written; nil = read before writing
	seq uint64            // highest sequence read or written
}

// maxWriteAttempts bounds the conflict retries of one write.
const maxWriteAttempts = 3

// read fetches the ConfigMap and learns its sequence. A missing ConfigMap
// is not an error (the first write creates it); an undecodable one is
// overwritten.
func (s *store) read(ctx context.Context) error {
	cm, err := s.client.CoreV1().ConfigMaps(s.namespace).Get(ctx, s.name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		s.cm = nil
		return nil
	}
	if err != nil {
		return fmt.Errorf("get ConfigMap %s/%s: %w", s.namespace, s.name, err)
	}
	s.cm = cm
	if d, err := Decode([]byte(cm.Data[DataKey])); err == nil {
		s.seq = max(s.seq, d.Sequence)
	}
	return nil
}

// write stores d (its Sequence is set here) and returns the sequence
// written.
func (s *store) write(ctx context.Context, d Document) (uint64, error) {
	var last error
	for range maxWriteAttempts {
		if s.cm == nil {
			if err := s.read(ctx); err != nil {
				return 0, err
			}
		}
		d.Sequence = s.seq + 1
		data, err := Encode(d)
		if err != nil {
			return 0, err
		}
		if s.cm == nil {
			created, err := s.client.CoreV1().ConfigMaps(s.namespace).Create(ctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: s.namespace, Labels: configMapLabels},
				Data:       map[string]string{DataKey: string(data)},
			}, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				last = err
				continue // read it, then update
			}
			if err != nil {
				return 0, fmt.Errorf("create ConfigMap %s/%s: %w", s.namespace, s.name, err)
			}
			s.cm, s.seq = created, d.Sequence
			return d.Sequence, nil
		}
		cm := s.cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[DataKey] = string(data)
		updated, err := s.client.CoreV1().ConfigMaps(s.namespace).Update(ctx, cm, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			last = err
			s.cm = nil
			continue
		}
		if err != nil {
			s.cm = nil
			return 0, fmt.Errorf("update ConfigMap %s/%s: %w", s.namespace, s.name, err)
		}
		s.cm, s.seq = updated, d.Sequence
		return d.Sequence, nil
	}
	return 0, fmt.Errorf("write ConfigMap %s/%s: %w", s.namespace, s.name, errors.Join(errConflicts, last))
}

// errConflicts reports a write that lost every optimistic-concurrency race.
var errConflicts = fmt.Errorf("still conflicting after %d attempts", maxWriteAttempts)

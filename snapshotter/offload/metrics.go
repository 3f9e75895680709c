package offload

import (
	"context"
	"errors"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dupsnap/dupsnap/proxy/client"
)

var (
	layersTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "layers_total",
		Help: "Layers offered to dedup offloading, by result (fetched, or the reason for falling back to an ordinary unpack: unconfigured, not_found, unreachable, timeout, corrupt, denied, error).",
	}, []string{"result"})
	neededBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "needed_bytes_total",
		Help: "Logical bytes of the objects offloaded layers needed that the node lacked.",
	})
	fetchedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "fetched_bytes_total",
		Help: "Logical bytes of objects_fetched_total.",
	})
	wireBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "wire_bytes_total",
		Help: "Bytes received from dupproxy, by kind (manifest, objects).",
	}, []string{"kind"})
	objectsFetched = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "objects_fetched_total",
		Help: "File objects received from dupproxy, verified and staged for the node CAS (each fetched once; see wasted_objects_total).",
	})
	wastedObjects = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "wasted_objects_total",
		Help: "File objects received from dupproxy that never reached the node CAS (their layer failed verification or was given up, a prefetch nobody took, staging failed).",
	})
	wastedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "wasted_bytes_total",
		Help: "Logical bytes of wasted_objects_total.",
	})
	layerSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "dupsnap", Subsystem: "offload", Name: "layer_seconds",
		Help:    "Time to offload one layer (manifest, objects, verification), by result.",
		Buckets: prometheus.ExponentialBuckets(0.005, 3, 10),
	}, []string{"result"})
)

// Collectors are the package's metrics; register them with the daemon's registry.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{layersTotal, neededBytes, fetchedBytes, wireBytes, objectsFetched, wastedObjects, wastedBytes, layerSeconds}
}

// stats are one layer's numbers.
type stats struct {
	objects, needed, fetched, requests   int
	neededBytes, fetchedBytes, wireBytes int64
	manifestBytes                        int64
	// Phase times, for the measurement log line (DUPSNAP_MEASURE in
	// integration/offload_test.go reads them).
	tManifest, tObjects, tVerify, tCommit time.Duration
	// Staged ahead by a prefetch (counted in the metrics when spent).
	prefetchWire int64
	tPrefetch    time.Duration
}

// result names the outcome of a fetch for metrics and logs.
func result(err error) string {
	switch {
	case err == nil:
		return "fetched"
	case errors.Is(err, ErrCorrupt), errors.Is(err, client.ErrCorrupt):
		return "corrupt"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, client.ErrNotFound):
		return "not_found"
	case errors.Is(err, client.ErrDenied):
		return "denied"
	case errdefs.IsNotFound(err), errdefs.IsInvalidArgument(err):
		return "unconfigured"
	default:
		var ne interface{ Timeout() bool }
		if errors.As(err, &ne) && ne.Timeout() {
			return "timeout"
		}
		return "unreachable_or_error"
	}
}

func (f *Fetcher) account(ctx context.Context, st stats, err error, took time.Duration) {
	res := result(err)
	layersTotal.WithLabelValues(res).Inc()
	layerSeconds.WithLabelValues(res).Observe(took.Seconds())
	neededBytes.Add(float64(st.neededBytes))
	fetchedBytes.Add(float64(st.fetchedBytes))
	wireBytes.WithLabelValues("manifest").Add(float64(st.manifestBytes))
	wireBytes.WithLabelValues("objects").Add(float64(st.wireBytes))
	objectsFetched.Add(float64(st.fetched))
	l := log.G(ctx).WithFields(log.Fields{
		"result":         res,
		"objects":        st.objects,
		"needed_objects": st.needed,
		"needed_bytes":   st.neededBytes,
		"fetched_bytes":  st.fetchedBytes,
		"wire_bytes":     st.wireBytes + st.manifestBytes,
		"requests":       st.requests,
		"took":           took,
		"t_manifest":     st.tManifest,
		"t_objects":      st.tObjects,
		"t_verify":       st.tVerify,
		"t_commit":       st.tCommit,
		"t_prefetch":     st.tPrefetch,
		"prefetch_wire":  st.prefetchWire,
	})
	switch res {
	case "fetched":
		l.Info("offload: layer pulled from dupproxy")
	case "corrupt":
		l.WithError(err).Warn("offload: verification failed, nothing kept; unpacking normally")
	case "unconfigured", "not_found":
		l.WithError(err).Debug("offload: layer not offloaded; unpacking normally")
	default:
		l.WithError(err).Warn("offload: dupproxy failed; unpacking normally")
	}
}

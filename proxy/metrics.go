package proxy

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics live in a registry of their own so several servers (tests) coexist.
type metrics struct {
	reg            *prometheus.Registry
	upstreamBytes  *prometheus.CounterVec
	upstreamErrors *prometheus.CounterVec
	servedBytes    *prometheus.CounterVec
	cacheRequests  *prometheus.CounterVec
	restoreSeconds *prometheus.HistogramVec
	logicalBytes   prometheus.Gauge
	physicalBytes  prometheus.Gauge
	ingests        *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		upstreamBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dupproxy_upstream_bytes_total", Help: "Bytes received from upstream registries, by kind (manifest, blob).",
		}, []string{"kind"}),
		upstreamErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dupproxy_upstream_errors_total", Help: "Failed upstream requests, by operation.",
		}, []string{"op"}),
		servedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dupproxy_served_bytes_total", Help: "Bytes sent to clients, by API (blob, manifest, dedup_manifest, dedup_objects).",
		}, []string{"api"}),
		cacheRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dupproxy_cache_requests_total", Help: "Layer blob reads by restore-cache result (hit, miss).",
		}, []string{"result"}),
		restoreSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "dupproxy_restore_seconds", Help: "Time to restore a layer blob from the store, by format.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
		}, []string{"format"}),
		logicalBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dupproxy_store_logical_bytes", Help: "Bytes of the blobs the store can serve (sum of blob sizes).",
		}),
		physicalBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dupproxy_store_physical_bytes", Help: "Bytes the store uses on disk (objects, manifests, retained blobs).",
		}),
		ingests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dupproxy_layer_ingests_total", Help: "Layers decomposed into the store, by result (recipe, retained, tar, rejected).",
		}, []string{"result"}),
	}
	m.reg.MustRegister(m.upstreamBytes, m.upstreamErrors, m.servedBytes, m.cacheRequests, m.restoreSeconds,
		m.logicalBytes, m.physicalBytes, m.ingests)
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "dupproxy_cache_hit_ratio", Help: "Restore-cache hits / layer blob reads since start.",
	}, m.hitRatio))
	return m
}

func (m *metrics) hitRatio() float64 {
	hit := counterValue(m.cacheRequests.WithLabelValues("hit"))
	miss := counterValue(m.cacheRequests.WithLabelValues("miss"))
	if hit+miss == 0 {
		return 0
	}
	return hit / (hit + miss)
}

func counterValue(c prometheus.Counter) float64 {
	ch := make(chan prometheus.Metric, 1)
	c.Collect(ch)
	mm := <-ch
	var out dtoMetric
	if err := mm.Write(&out.m); err != nil || out.m.Counter == nil {
		return 0
	}
	return out.m.Counter.GetValue()
}

// Handler serves the metrics in the Prometheus text format.
func (m *metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

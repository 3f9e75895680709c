package snapshotter

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/dupsnap/dupsnap/pkg/rootfs"
)

// fuseCollector exports the FUSE request counts and latencies of the live
// rootfs servers, summed. Each server publishes its own totals in a file
// (rootfs.StatsPath); a server that exits takes its counts with it, which
// Prometheus reads as a counter reset.
type fuseCollector struct {
	s                *Snapshotter
	opsDesc, latDesc *prometheus.Desc
}

func newFuseCollector(s *Snapshotter) *fuseCollector {
	return &fuseCollector{
		s: s,
		opsDesc: prometheus.NewDesc("dupsnap_fuse_operations_total",
			"FUSE requests answered by the live rootfs servers, by operation.", []string{"op"}, nil),
		latDesc: prometheus.NewDesc("dupsnap_fuse_operation_seconds",
			"Latency of FUSE requests answered by the live rootfs servers, by operation.", []string{"op"}, nil),
	}
}

func (c *fuseCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.opsDesc
	ch <- c.latDesc
}

type fuseTotals struct {
	count   uint64
	seconds float64
	buckets []uint64
}

func (c *fuseCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	totals := map[string]*fuseTotals{}
	for _, mp := range c.s.liveMounts(ctx) {
		st, err := rootfs.ReadStats(mp)
		if err != nil {
			continue // not published yet
		}
		for op, o := range st.Ops {
			t := totals[op]
			if t == nil {
				t = &fuseTotals{buckets: make([]uint64, len(rootfs.StatsBuckets))}
				totals[op] = t
			}
			t.count += o.Count
			t.seconds += o.Seconds
			for i := range t.buckets {
				if i < len(o.Buckets) {
					t.buckets[i] += o.Buckets[i]
				}
			}
		}
	}
	for op, t := range totals {
		ch <- prometheus.MustNewConstMetric(c.opsDesc, prometheus.CounterValue, float64(t.count), op)
		b := make(map[float64]uint64, len(t.buckets))
		for i, le := range rootfs.StatsBuckets {
			b[le] = t.buckets[i]
		}
		ch <- prometheus.MustNewConstHistogram(c.latDesc, t.count, t.seconds, b, op)
	}
}

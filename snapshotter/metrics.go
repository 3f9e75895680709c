package snapshotter

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/dupsnap/dupsnap/pkg/cas"
)

var (
	opDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "dupsnap", Name: "snapshot_operation_seconds",
		Help:    "Duration of snapshotter operations.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
	}, []string{"op"})
	unpackHits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "dupsnap", Name: "unpack_skipped_total",
		Help: "Unpacks skipped because the layer was on the node (chain: snapshot exists; layer: committed from a known diffID; staged: known layer in a parallel unpack).",
	}, []string{"reason"})
	ingestedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Name: "ingested_new_bytes_total",
		Help: "Bytes of file content that commits added to the CAS.",
	})
	rootfsStarts = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "dupsnap", Name: "rootfs_starts_total",
		Help: "Rootfs servers started (including restarts after recovery).",
	})
)

func observe(op string, start time.Time) {
	opDuration.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

// Collector exports the state of a Snapshotter. Store totals need a walk
// of the CAS, so they are cached for cacheFor.
type Collector struct {
	s        *Snapshotter
	cacheFor time.Duration

	mu       sync.Mutex
	at       time.Time
	objects  int64
	logical  int64
	physical int64

	snapshotsDesc, aliveDesc, objectsDesc, logicalDesc, physicalDesc, layersDesc *prometheus.Desc
}

// NewCollector returns the collector for s plus the package's own metrics
// (operation latencies, unpack hits, ingested bytes); register the result.
func NewCollector(s *Snapshotter) []prometheus.Collector {
	c := &Collector{
		s:             s,
		cacheFor:      30 * time.Second,
		snapshotsDesc: prometheus.NewDesc("dupsnap_snapshots", "Snapshots by kind.", []string{"kind"}, nil),
		aliveDesc:     prometheus.NewDesc("dupsnap_rootfs_alive", "Rootfs server processes alive.", nil, nil),
		objectsDesc:   prometheus.NewDesc("dupsnap_store_objects", "Objects in the node CAS.", nil, nil),
		logicalDesc:   prometheus.NewDesc("dupsnap_store_logical_bytes", "Logical (uncompressed) bytes of CAS objects.", nil, nil),
		physicalDesc:  prometheus.NewDesc("dupsnap_store_physical_bytes", "Bytes CAS objects take on disk.", nil, nil),
		layersDesc:    prometheus.NewDesc("dupsnap_layers", "Layer manifests in the store.", nil, nil),
	}
	return []prometheus.Collector{c, newFuseCollector(s), opDuration, unpackHits, ingestedBytes, rootfsStarts}
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.snapshotsDesc, c.aliveDesc, c.objectsDesc, c.logicalDesc, c.physicalDesc, c.layersDesc} {
		ch <- d
	}
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kinds := map[snapshots.Kind]int{snapshots.KindActive: 0, snapshots.KindView: 0, snapshots.KindCommitted: 0}
	_ = c.s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return noBucketOK(storage.WalkInfo(ctx, func(_ context.Context, i snapshots.Info) error {
			kinds[i.Kind]++
			return nil
		}))
	})
	for k, n := range kinds {
		ch <- prometheus.MustNewConstMetric(c.snapshotsDesc, prometheus.GaugeValue, float64(n), k.String())
	}
	ch <- prometheus.MustNewConstMetric(c.aliveDesc, prometheus.GaugeValue, float64(c.s.aliveCount(ctx)))
	if l, err := c.s.layers.List(ctx); err == nil {
		ch <- prometheus.MustNewConstMetric(c.layersDesc, prometheus.GaugeValue, float64(len(l)))
	}

	c.mu.Lock()
	if time.Since(c.at) > c.cacheFor {
		var o, lg, ph int64
		if err := c.s.cas.Walk(ctx, func(i cas.Info) error {
			o++
			lg += i.Size
			ph += i.Stored
			return nil
		}); err == nil {
			c.objects, c.logical, c.physical, c.at = o, lg, ph, time.Now()
		}
	}
	o, lg, ph := c.objects, c.logical, c.physical
	c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(c.objectsDesc, prometheus.GaugeValue, float64(o))
	ch <- prometheus.MustNewConstMetric(c.logicalDesc, prometheus.GaugeValue, float64(lg))
	ch <- prometheus.MustNewConstMetric(c.physicalDesc, prometheus.GaugeValue, float64(ph))
}

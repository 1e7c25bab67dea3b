package engine

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vmherd/vmherd/internal/hosts"
)

// hostCollector tells Prometheus, at each scrape, every known host's
// heartbeat age and whether it is alive and cordoned.
type hostCollector struct{ reg *hosts.Registry }

var (
	hostAgeDesc = prometheus.NewDesc("vmherd_host_heartbeat_age_seconds",
		"Seconds since the server stored the host's last heartbeat.", []string{"host"}, nil)
	hostUpDesc = prometheus.NewDesc("vmherd_host_up",
		"1 if the host is alive (heartbeat younger than --host-timeout), 0 if lost.", []string{"host"}, nil)
	hostCordonedDesc = prometheus.NewDesc("vmherd_host_cordoned",
		"1 if the host is cordoned.", []string{"host"}, nil)
)

func (c hostCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- hostAgeDesc
	ch <- hostUpDesc
	ch <- hostCordonedDesc
}

func (c hostCollector) Collect(ch chan<- prometheus.Metric) {
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	for _, h := range c.reg.List() {
		ch <- prometheus.MustNewConstMetric(hostAgeDesc, prometheus.GaugeValue, time.Since(h.Time).Seconds(), h.Host)
		ch <- prometheus.MustNewConstMetric(hostUpDesc, prometheus.GaugeValue, b(h.Alive), h.Host)
		ch <- prometheus.MustNewConstMetric(hostCordonedDesc, prometheus.GaugeValue, b(h.Cordon != nil), h.Host)
	}
}

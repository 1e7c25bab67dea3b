// Package jsetup is vmherd's JetStream set-up: the streams and buckets
// with their settings (StreamConfigs, BucketConfigs, Settings), creating
// and checking them at start-up (Ensure, EnsureBucket, Check), riding out
// a cluster that is still forming (RetryStartup, Transient, with the
// server's error codes named: ErrCodeInsufficientResources,
// ErrCodeNoSuitablePeers), and the consumers the engines make and their
// bound (HostTaskConsumerConfig, CreateConsumer, DropConsumer,
// MaxConsumers, ConsumerBound).
package jsetup

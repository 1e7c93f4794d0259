//! Wiring a node's container runtime to the mirror: containerd's certs.d
//! and config.toml ([`containerd`]), and rke2/k3s `registries.yaml`
//! ([`registries`]).

pub mod containerd;
pub mod registries;

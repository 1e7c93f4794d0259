//! Integration tests: one binary, a module per topic, a shared harness.

mod support;

mod airgap;
mod bounds;
mod cache;
mod cli;
mod clients;
mod cluster;
mod e2e;
mod hostile;
mod input;
mod kubernetes;
mod lazy;
mod node;
mod operators;
mod packaging;
mod peers;
mod pins;
mod private;
mod proxy;
mod ranged;
mod restricted;
mod routes;
mod runtimes;
mod scale;
mod tls;

//! `nodemirror cluster ca` and `nodemirror cluster cert`: the cluster's
//! own certificate authority and one certificate per node, naming the
//! node's addresses (peers check them against the members).

use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Writes `ca.pem` and `ca-key.pem` (mode 0600) into `out`.
pub fn write_ca(out: &Path) -> Result<(), String> {
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "nodemirror cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("signing the CA: {e}"))?;
    write(out, "ca.pem", &cert.pem(), 0o644)?;
    write(out, "ca-key.pem", &key.serialize_pem(), 0o600)
}

/// Writes `NAME.pem` and `NAME-key.pem` into `out`: a certificate for
/// both ends of mutual TLS, naming `ips` and `dns`, signed by the CA in
/// `ca_dir`.
pub fn write_cert(
    ca_dir: &Path,
    name: &str,
    ips: &[IpAddr],
    dns: &[String],
    out: &Path,
) -> Result<(), String> {
    if name.is_empty() || name.contains(['/', '\0']) {
        return Err(format!("--name {name:?} is not a file name"));
    }
    if ips.is_empty() {
        return Err("a node certificate needs at least one --ip (peers check it)".into());
    }
    let read = |file: &str| {
        std::fs::read_to_string(ca_dir.join(file))
            .map_err(|e| format!("{}: {e}", ca_dir.join(file).display()))
    };
    let ca_key = KeyPair::from_pem(&read("ca-key.pem")?)
        .map_err(|e| format!("{}: {e}", ca_dir.join("ca-key.pem").display()))?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key)
        .map_err(|e| format!("{}: {e}", ca_dir.join("ca.pem").display()))?;
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    let mut names: Vec<SanType> = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    for d in dns {
        let name = d
            .as_str()
            .try_into()
            .map_err(|e| format!("--dns {d:?}: {e}"))?;
        names.push(SanType::DnsName(name));
    }
    params.subject_alt_names = names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2099, 1, 1);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| format!("signing: {e}"))?;
    write(out, &format!("{name}.pem"), &cert.pem(), 0o644)?;
    write(out, &format!("{name}-key.pem"), &key.serialize_pem(), 0o600)
}

fn write(dir: &Path, file: &str, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(file);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(|e| format!("{}: {e} (not overwritten)", path.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

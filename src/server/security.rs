//! TLS, access rules and connection limits, resolved against the exports
//! the server starts with.

use std::sync::Arc;

use crate::export::Export;
use crate::net::access::{AccessPolicy, ConnectionLimits, LimitConfig, Rule};
use crate::tls::{CredentialSource, TlsMode, TlsServer};

/// The command line's security options, as given.
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    pub tls_mode: TlsMode,
    pub credentials: Option<CredentialSource>,
    /// `--tls-only EXPORT` values.
    pub tls_only: Vec<String>,
    /// `--allow [EXPORT=]RULE` values.
    pub allow: Vec<String>,
    /// `--max-connections [EXPORT=]N` values.
    pub max_connections: Vec<String>,
    pub max_connections_per_address: Option<usize>,
    /// What config-file export tables set, by exact export name (names
    /// there may contain `=`, which the `[EXPORT=]` forms cannot carry).
    pub exports: Vec<ExportSecurity>,
}

/// One export's own TLS-only flag, allow-list and connection limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSecurity {
    pub name: String,
    pub tls_only: bool,
    pub allow: Vec<String>,
    pub max_connections: Option<usize>,
}

/// What the accept side enforces.
pub struct Security {
    pub tls: Option<Arc<TlsServer>>,
    pub access: AccessPolicy,
    pub limits: Arc<ConnectionLimits>,
}

/// `EXPORT=VALUE` when EXPORT names an export, else the whole text (the
/// convention `--description` and `--checkpoint` follow).
fn per_export<'a>(text: &'a str, exports: &[Export]) -> (Option<&'a str>, &'a str) {
    match text.split_once('=') {
        Some((export, value)) if exports.iter().any(|e| e.info.name == export) => (Some(export), value),
        _ => (None, text),
    }
}

impl SecurityConfig {
    /// Marks TLS-only exports, loads credentials and parses the rules.
    /// Errors name the option.
    pub fn resolve(&self, exports: &mut [Export]) -> Result<Security, String> {
        for name in &self.tls_only {
            let export = exports
                .iter_mut()
                .find(|e| e.info.name == *name)
                .ok_or_else(|| format!("--tls-only {name}: no such export"))?;
            export.info.tls_only = true;
        }
        let tls = match (&self.credentials, self.tls_mode) {
            (Some(source), mode) if mode != TlsMode::Off => {
                Some(Arc::new(TlsServer::new(mode, source.clone()).map_err(|e| e.to_string())?))
            }
            _ => None,
        };
        let mut access = AccessPolicy::default();
        for text in &self.allow {
            let (export, rule) = per_export(text, exports);
            let rule = self.rule(rule, &format!("--allow {text}"))?;
            match export {
                Some(export) => access.per_export.entry(export.to_owned()).or_default().push(rule),
                None => access.everywhere.push(rule),
            }
        }
        let mut limits = LimitConfig { per_address_max: self.max_connections_per_address, ..Default::default() };
        for text in &self.max_connections {
            let (export, count) = per_export(text, exports);
            let count: usize =
                count.parse().map_err(|_| format!("--max-connections {text}: not a number of connections"))?;
            match export {
                Some(export) => {
                    limits.per_export_max.insert(export.to_owned(), count);
                }
                None => limits.total_max = Some(count),
            }
        }
        for own in &self.exports {
            let export = exports
                .iter_mut()
                .find(|e| e.info.name == own.name)
                .ok_or_else(|| format!("export {:?}: no such export", own.name))?;
            export.info.tls_only |= own.tls_only;
            for text in &own.allow {
                let rule = self.rule(text, &format!("export {:?}: allow {text:?}", own.name))?;
                access.per_export.entry(own.name.clone()).or_default().push(rule);
            }
            if let Some(max) = own.max_connections {
                limits.per_export_max.insert(own.name.clone(), max);
            }
        }
        if exports.iter().any(|e| e.info.tls_only) && self.tls_mode == TlsMode::Off {
            return Err("a TLS-only export needs TLS (credentials, and not --tls off)".into());
        }
        Ok(Security { tls, access, limits: ConnectionLimits::new(limits) })
    }

    /// Parses an allow rule and checks the credentials it needs are in use;
    /// errors start with `what`.
    pub(super) fn rule(&self, text: &str, what: &str) -> Result<Rule, String> {
        let rule: Rule = text.parse().map_err(|e| format!("{what}: {e}"))?;
        match (&rule, &self.credentials) {
            (Rule::Subject(_), Some(CredentialSource::X509 { verify_peer: true, .. })) => {}
            (Rule::Subject(_), _) => return Err(format!("{what}: certificate subjects need --tls-verify-peer")),
            (Rule::PskUser(_), Some(CredentialSource::Psk { .. })) => {}
            (Rule::PskUser(_), _) => return Err(format!("{what}: PSK users need --tls-psk")),
            _ => {}
        }
        Ok(rule)
    }
}

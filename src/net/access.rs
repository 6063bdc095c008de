//! Who may use which export, and how many may at once.
//!
//! Rules (`--allow [EXPORT=]RULE`) come in two kinds: identities (a client
//! certificate subject, a PSK username) and addresses (an IP network, a
//! Unix peer uid). Rules without an export apply to every export; an
//! export's own rules apply on top. Within one set of rules, a client
//! passes a kind that has rules when it matches any of them; a kind without
//! rules lets everyone pass. So `--allow addr:10.0.0.0/8 --allow
//! backup=dn:CN=backup` means: everything only from 10/8, and `backup`
//! only for the certificate `CN=backup`, from there.
//!
//! Connection limits (`--max-connections`, per export, per address) count
//! transmission connections: a slot is taken at GO and given back when
//! the worker closes the connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

use crate::proto::handshake::{ExportGate, ExportInfo};
use crate::tls::PeerIdentity;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `dn:SUBJECT`: a verified client certificate with this subject
    /// (RFC 4514, as `ringnbd -v` logs it).
    Subject(String),
    /// `psk:USER`: a PSK username.
    PskUser(String),
    /// `addr:IP[/PREFIX]`: a TCP client in this network.
    Network { base: IpAddr, prefix: u8 },
    /// `uid:N`: a Unix-socket client running as this user.
    Uid(u32),
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RuleError {
    #[error("{0:?}: use dn:SUBJECT, psk:USER, addr:IP[/PREFIX] or uid:N")]
    Unknown(String),
    #[error("{0:?}: not an IP address or network (e.g. 192.0.2.0/24, ::1)")]
    BadNetwork(String),
    #[error("{0:?}: not a user id")]
    BadUid(String),
}

impl std::str::FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, value) = text.split_once(':').ok_or_else(|| RuleError::Unknown(text.to_owned()))?;
        match kind {
            "dn" if !value.is_empty() => Ok(Rule::Subject(value.to_owned())),
            "psk" if !value.is_empty() => Ok(Rule::PskUser(value.to_owned())),
            "addr" => parse_network(value).ok_or_else(|| RuleError::BadNetwork(value.to_owned())),
            "uid" => value.parse().map(Rule::Uid).map_err(|_| RuleError::BadUid(value.to_owned())),
            _ => Err(RuleError::Unknown(text.to_owned())),
        }
    }
}

fn parse_network(text: &str) -> Option<Rule> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix.parse::<u8>().ok()?)),
        None => (text, None),
    };
    let base: IpAddr = address.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    let bits = if base.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(bits);
    (prefix <= bits).then_some(Rule::Network { base, prefix })
}

/// IPv4 clients of a dual-stack listener arrive as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_network(ip: IpAddr, base: IpAddr, prefix: u8) -> bool {
    match (canonical(ip), canonical(base)) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// What is known about a client before and after TLS.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// A TCP client's address.
    pub ip: Option<IpAddr>,
    /// A Unix-socket client's uid (SO_PEERCRED).
    pub uid: Option<u32>,
    /// What counts against `--max-connections-per-address`.
    pub address: String,
}

impl Rule {
    fn is_identity(&self) -> bool {
        matches!(self, Rule::Subject(_) | Rule::PskUser(_))
    }

    fn matches(&self, peer: &Peer, identity: Option<&PeerIdentity>) -> bool {
        match (self, identity) {
            (Rule::Subject(want), Some(PeerIdentity::Certificate { subject })) => want == subject,
            (Rule::PskUser(want), Some(PeerIdentity::Psk { username })) => want == username,
            (Rule::Network { base, prefix }, _) => peer.ip.is_some_and(|ip| in_network(ip, *base, *prefix)),
            (Rule::Uid(want), _) => peer.uid == Some(*want),
            _ => false,
        }
    }
}

/// Why `rules` refuse the client, if they do.
fn refusal(rules: &[Rule], peer: &Peer, identity: Option<&PeerIdentity>) -> Option<String> {
    let (identities, addresses): (Vec<&Rule>, Vec<&Rule>) = rules.iter().partition(|r| r.is_identity());
    if !addresses.is_empty() && !addresses.iter().any(|r| r.matches(peer, identity)) {
        let who = match (peer.ip, peer.uid) {
            (Some(ip), _) => format!("address {ip}"),
            (None, Some(uid)) => format!("uid {uid}"),
            (None, None) => "this client".to_owned(),
        };
        return Some(format!("{who} is not on the allow-list"));
    }
    if !identities.is_empty() && !identities.iter().any(|r| r.matches(peer, identity)) {
        return Some(match identity {
            None => "a TLS client identity is required (certificate or PSK)".to_owned(),
            Some(identity) => format!("{identity} is not on the allow-list"),
        });
    }
    None
}

/// Every `--allow` rule: the ones for all exports and each export's own.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    pub everywhere: Vec<Rule>,
    pub per_export: HashMap<String, Vec<Rule>>,
}

impl AccessPolicy {
    /// Whether some rule needs to know who the client is.
    pub fn needs_identity(&self) -> bool {
        self.everywhere.iter().chain(self.per_export.values().flatten()).any(Rule::is_identity)
    }

    pub fn check(&self, export: &str, peer: &Peer, identity: Option<&PeerIdentity>) -> Result<(), String> {
        if let Some(why) = refusal(&self.everywhere, peer, identity) {
            return Err(why);
        }
        match self.per_export.get(export).and_then(|rules| refusal(rules, peer, identity)) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// The access rules handshakes use; exports added, changed or removed
/// while serving replace them (a handshake keeps the rules it started with).
#[derive(Debug, Default)]
pub struct SharedPolicy(RwLock<Arc<AccessPolicy>>);

impl SharedPolicy {
    pub fn new(policy: AccessPolicy) -> Self {
        Self(RwLock::new(Arc::new(policy)))
    }

    pub fn current(&self) -> Arc<AccessPolicy> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Sets the export's own rules (none: everyone the global rules let in).
    pub fn set_export(&self, export: &str, rules: Vec<Rule>) {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        let mut next = AccessPolicy::clone(&current);
        if rules.is_empty() {
            next.per_export.remove(export);
        } else {
            next.per_export.insert(export.to_owned(), rules);
        }
        *current = Arc::new(next);
    }
}

/// `--max-connections` and its per-export and per-address forms.
#[derive(Debug, Clone, Default)]
pub struct LimitConfig {
    pub total_max: Option<usize>,
    pub per_export_max: HashMap<String, usize>,
    pub per_address_max: Option<usize>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Per-export maximums change with the exports (see `set_export_max`).
    per_export_max: HashMap<String, usize>,
    total: usize,
    per_export: HashMap<String, usize>,
    per_address: HashMap<String, usize>,
}

/// Live transmission connections against the limits.
pub struct ConnectionLimits {
    config: LimitConfig,
    counts: Mutex<Counts>,
    /// Called when the last connection closes (`--exit-when-idle`, `-s`).
    on_idle: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionLimits").field("config", &self.config).field("counts", &self.counts).finish()
    }
}

/// One transmission connection's place in the counts; dropping it (when
/// the connection closes) gives the place back.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    export: String,
    address: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.limits.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        decrement(&mut counts.per_export, &self.export);
        decrement(&mut counts.per_address, &self.address);
        let idle = counts.total == 0;
        drop(counts);
        if idle && let Some(on_idle) = self.limits.on_idle.get() {
            on_idle();
        }
    }
}

fn decrement(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(count) = map.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            map.remove(key);
        }
    }
}

impl ConnectionLimits {
    pub fn new(mut config: LimitConfig) -> Arc<Self> {
        let counts = Counts { per_export_max: std::mem::take(&mut config.per_export_max), ..Default::default() };
        Arc::new(Self { config, counts: Mutex::new(counts), on_idle: Default::default() })
    }

    /// Calls `f` each time the last transmission connection closes. Set
    /// once, before serving.
    pub fn when_idle(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_idle.set(f);
    }

    /// Takes a slot for a connection to `export` from `address`, or says
    /// which limit is reached.
    pub fn claim(self: &Arc<Self>, export: &str, address: &str) -> Result<Slot, String> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(max) = self.config.total_max
            && counts.total >= max
        {
            return Err(format!("the server has its maximum of {max} connections"));
        }
        if let Some(&max) = counts.per_export_max.get(export)
            && counts.per_export.get(export).copied().unwrap_or(0) >= max
        {
            return Err(format!("the export has its maximum of {max} connections"));
        }
        if let Some(max) = self.config.per_address_max
            && counts.per_address.get(address).copied().unwrap_or(0) >= max
        {
            return Err(format!("{address} has its maximum of {max} connections"));
        }
        counts.total += 1;
        *counts.per_export.entry(export.to_owned()).or_default() += 1;
        *counts.per_address.entry(address.to_owned()).or_default() += 1;
        Ok(Slot { limits: Arc::clone(self), export: export.to_owned(), address: address.to_owned() })
    }

    /// Sets or clears an export's own maximum; connections it has beyond
    /// a lowered one stay, new ones wait for the count to drop below it.
    pub fn set_export_max(&self, export: &str, max: Option<usize>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match max {
            Some(max) => counts.per_export_max.insert(export.to_owned(), max),
            None => counts.per_export_max.remove(export),
        };
    }

    pub fn total(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

/// One client's gate during its negotiation: the rules, the limits, and
/// what is known about the client (its TLS identity arrives mid-way).
pub struct ClientGate<'a> {
    pub exports: &'a [ExportInfo],
    pub policy: &'a AccessPolicy,
    pub limits: &'a Arc<ConnectionLimits>,
    pub peer: Peer,
    pub identity: std::cell::RefCell<Option<PeerIdentity>>,
    /// The slot GO took, for the connection to carry.
    pub slot: std::cell::RefCell<Option<Slot>>,
}

impl ExportGate for ClientGate<'_> {
    fn check(&self, export: usize) -> Result<(), String> {
        let identity = self.identity.borrow();
        self.policy.check(&self.exports[export].name, &self.peer, identity.as_ref())
    }

    fn claim(&self, export: usize) -> Result<(), String> {
        let slot = self.limits.claim(&self.exports[export].name, &self.peer.address)?;
        *self.slot.borrow_mut() = Some(slot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str) -> Peer {
        Peer { ip: Some(ip.parse().unwrap()), uid: None, address: ip.to_owned() }
    }

    #[test]
    fn rules_parse_and_reject_what_they_cannot_mean() {
        assert_eq!("dn:CN=a,O=b".parse::<Rule>(), Ok(Rule::Subject("CN=a,O=b".into())));
        assert_eq!("psk:alice".parse::<Rule>(), Ok(Rule::PskUser("alice".into())));
        assert_eq!("uid:1000".parse::<Rule>(), Ok(Rule::Uid(1000)));
        assert_eq!(
            "addr:10.0.0.0/8".parse::<Rule>(),
            Ok(Rule::Network { base: "10.0.0.0".parse().unwrap(), prefix: 8 })
        );
        assert_eq!("addr:[::1]".parse::<Rule>(), Ok(Rule::Network { base: "::1".parse().unwrap(), prefix: 128 }));
        assert!(matches!("addr:10.0.0.0/33".parse::<Rule>(), Err(RuleError::BadNetwork(_))));
        assert!(matches!("uid:root".parse::<Rule>(), Err(RuleError::BadUid(_))));
        assert!(matches!("cn:x".parse::<Rule>(), Err(RuleError::Unknown(_))));
        assert!(matches!("dn:".parse::<Rule>(), Err(RuleError::Unknown(_))));
    }

    #[test]
    fn networks_match_by_prefix_and_mapped_v4_counts_as_v4() {
        let rule: Rule = "addr:192.0.2.0/24".parse().unwrap();
        assert!(rule.matches(&tcp("192.0.2.77"), None));
        assert!(rule.matches(&tcp("::ffff:192.0.2.1"), None));
        assert!(!rule.matches(&tcp("192.0.3.1"), None));
        assert!(!rule.matches(&tcp("::1"), None));
        let all: Rule = "addr:0.0.0.0/0".parse().unwrap();
        assert!(all.matches(&tcp("203.0.113.9"), None));
    }

    #[test]
    fn each_kind_with_rules_must_match_and_export_rules_add_to_global_ones() {
        let mut policy = AccessPolicy { everywhere: vec!["addr:127.0.0.0/8".parse().unwrap()], ..Default::default() };
        policy.per_export.insert("backup".into(), vec!["dn:CN=backup".parse().unwrap()]);
        let local = tcp("127.0.0.1");
        let backup = PeerIdentity::Certificate { subject: "CN=backup".into() };
        let other = PeerIdentity::Certificate { subject: "CN=other".into() };
        assert!(policy.check("disk", &local, None).is_ok());
        assert!(policy.check("disk", &tcp("10.1.1.1"), None).unwrap_err().contains("not on the allow-list"));
        assert!(policy.check("backup", &local, None).unwrap_err().contains("identity is required"));
        assert!(policy.check("backup", &local, Some(&other)).unwrap_err().contains("CN=other"));
        assert!(policy.check("backup", &local, Some(&backup)).is_ok());
        assert!(policy.check("backup", &tcp("10.1.1.1"), Some(&backup)).is_err());
        assert!(policy.needs_identity());
    }

    #[test]
    fn limits_count_total_export_and_address_and_slots_give_back() {
        let mut config = LimitConfig { total_max: Some(3), per_address_max: Some(2), ..Default::default() };
        config.per_export_max.insert("small".into(), 1);
        let limits = ConnectionLimits::new(config);
        let a = limits.claim("small", "A").unwrap();
        assert!(limits.claim("small", "B").unwrap_err().contains("export has its maximum of 1"));
        let b = limits.claim("disk", "A").unwrap();
        assert!(limits.claim("disk", "A").unwrap_err().contains("A has its maximum of 2"));
        let c = limits.claim("disk", "B").unwrap();
        assert!(limits.claim("disk", "C").unwrap_err().contains("maximum of 3 connections"));
        drop(a);
        assert_eq!(limits.total(), 2);
        let d = limits.claim("small", "C").unwrap();
        drop((b, c, d));
        assert_eq!(limits.total(), 0);
    }

    #[test]
    fn export_rules_and_limits_change_while_serving() {
        let shared = SharedPolicy::new(AccessPolicy::default());
        let before = shared.current();
        shared.set_export("disk", vec!["addr:10.0.0.0/8".parse().unwrap()]);
        assert!(shared.current().check("disk", &tcp("127.0.0.1"), None).is_err());
        assert!(before.check("disk", &tcp("127.0.0.1"), None).is_ok(), "a handshake keeps the rules it began with");
        shared.set_export("disk", Vec::new());
        assert!(shared.current().check("disk", &tcp("127.0.0.1"), None).is_ok());

        let limits = ConnectionLimits::new(LimitConfig::default());
        let a = limits.claim("disk", "A").unwrap();
        limits.set_export_max("disk", Some(1));
        assert!(limits.claim("disk", "B").is_err(), "a lowered limit holds new clients back");
        drop(a);
        let b = limits.claim("disk", "B").unwrap();
        limits.set_export_max("disk", None);
        let c = limits.claim("disk", "C").unwrap();
        drop((b, c));
    }

    #[test]
    fn the_idle_callback_runs_when_the_last_connection_closes() {
        let limits = ConnectionLimits::new(LimitConfig::default());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        limits.when_idle(Box::new(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let (a, b) = (limits.claim("disk", "A").unwrap(), limits.claim("disk", "B").unwrap());
        drop(a);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0, "one is still open");
        drop(b);
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(limits.claim("disk", "A").unwrap());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}

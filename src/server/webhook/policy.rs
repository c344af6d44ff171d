//! The webhook address policy: one named table of address ranges, each with
//! the class that says when it is refused, and IPv4 carried inside IPv6
//! (mapped, compatible, NAT64, 6to4, Teredo, ISATAP) judged as the IPv4 address it is,
//! since that is where the packets end up.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::server::WebhookConfig;

/// When a class of addresses is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Always: nothing that should get a webhook lives there.
    Always,
    /// Unless `allow_link_local` is set.
    UnlessAllowLinkLocal,
    /// When `block_private` is set (shared deployments).
    WhenBlockPrivate,
}

/// A class of addresses; [`Class::rule`] says when it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Instance metadata and credential endpoints of the clouds.
    CloudMetadata,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// Reserved for documentation: never a real host.
    Documentation,
    /// Reserved, deprecated or discard-only.
    Reserved,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918.
    Private,
    /// fc00::/7.
    UniqueLocal,
    /// 100.64.0.0/10, carrier-grade NAT.
    Cgnat,
    /// 198.18.0.0/15, 2001:2::/48.
    Benchmarking,
    /// 192.0.0.0/24: addresses with local meanings.
    ProtocolAssignment,
    /// 64:ff9b:1::/48: NAT64 prefixes of a private network.
    LocalUseNat64,
}

impl Class {
    /// When this class is refused.
    pub const fn rule(self) -> Rule {
        match self {
            Class::LinkLocal => Rule::UnlessAllowLinkLocal,
            Class::Loopback
            | Class::Private
            | Class::UniqueLocal
            | Class::Cgnat
            | Class::Benchmarking
            | Class::ProtocolAssignment
            | Class::LocalUseNat64 => Rule::WhenBlockPrivate,
            Class::CloudMetadata
            | Class::Unspecified
            | Class::Multicast
            | Class::Broadcast
            | Class::Documentation
            | Class::Reserved => Rule::Always,
        }
    }

    /// The class as a refusal names it.
    pub const fn described(self) -> &'static str {
        match self {
            Class::CloudMetadata => "a cloud metadata address",
            Class::LinkLocal => "a link-local address",
            Class::Unspecified => "an unspecified address",
            Class::Multicast => "a multicast address",
            Class::Broadcast => "the broadcast address",
            Class::Documentation => "a documentation address",
            Class::Reserved => "a reserved address",
            Class::Loopback => "a loopback address",
            Class::Private => "a private address",
            Class::UniqueLocal => "a unique-local IPv6 address",
            Class::Cgnat => "a CGNAT (shared) address",
            Class::Benchmarking => "a benchmarking address",
            Class::ProtocolAssignment => "an IETF protocol assignment address",
            Class::LocalUseNat64 => "a local-use NAT64 address",
        }
    }

    fn refused(self, cfg: &WebhookConfig) -> bool {
        match self.rule() {
            Rule::Always => true,
            Rule::UnlessAllowLinkLocal => !cfg.allow_link_local,
            Rule::WhenBlockPrivate => cfg.block_private,
        }
    }
}

/// A network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    /// The first address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Net {
    const fn v4(a: [u8; 4], len: u8) -> Net {
        Net {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            len,
        }
    }

    const fn v6(s: [u16; 8], len: u8) -> Net {
        Net {
            addr: IpAddr::V6(Ipv6Addr::new(
                s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
            )),
            len,
        }
    }

    /// The address as bits, and how many bits the family has.
    fn bits(ip: IpAddr) -> (u128, u8) {
        match ip {
            IpAddr::V4(v4) => (u128::from(v4.to_bits()), 32),
            IpAddr::V6(v6) => (v6.to_bits(), 128),
        }
    }

    /// The mask of the prefix, in a family of `width` bits.
    fn mask(&self, width: u8) -> u128 {
        let all = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        let host = all.checked_shr(u32::from(self.len)).unwrap_or(0);
        all & !host
    }

    /// Whether `ip` is in this network (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (net, width) = Self::bits(self.addr);
        let (ip, ip_width) = Self::bits(ip);
        width == ip_width && (net ^ ip) & self.mask(width) == 0
    }

    /// The first and the last address of the network.
    pub fn bounds(&self) -> (IpAddr, IpAddr) {
        let (net, width) = Self::bits(self.addr);
        let mask = self.mask(width);
        let all = if width == 128 {
            u128::MAX
        } else {
            (1u128 << width) - 1
        };
        let last = (net & mask) | (all & !mask);
        let ip = |b: u128| match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from_bits(b as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from_bits(b)),
        };
        (ip(net & mask), ip(last))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A named range and its class.
#[derive(Debug)]
pub struct Range {
    /// The network.
    pub net: Net,
    /// What it is, in a few words.
    pub name: &'static str,
    /// Its class (and so when it is refused).
    pub class: Class,
}

const fn r4(a: [u8; 4], len: u8, name: &'static str, class: Class) -> Range {
    Range {
        net: Net::v4(a, len),
        name,
        class,
    }
}

const fn r6(s: [u16; 8], len: u8, name: &'static str, class: Class) -> Range {
    Range {
        net: Net::v6(s, len),
        name,
        class,
    }
}

use Class::*;

/// Every range the policy knows. An address takes the class of the most
/// specific range holding it (169.254.169.254 is metadata, not just link-local).
pub const RANGES: &[Range] = &[
    r4([0, 0, 0, 0], 8, "\"this network\"", Unspecified),
    r4([10, 0, 0, 0], 8, "RFC 1918", Private),
    r4([100, 64, 0, 0], 10, "carrier-grade NAT", Cgnat),
    r4(
        [100, 100, 100, 200],
        32,
        "Alibaba Cloud metadata",
        CloudMetadata,
    ),
    r4([127, 0, 0, 0], 8, "IPv4 loopback", Loopback),
    r4([168, 63, 129, 16], 32, "Azure WireServer", CloudMetadata),
    r4([169, 254, 0, 0], 16, "IPv4 link-local", LinkLocal),
    r4(
        [169, 254, 0, 23],
        32,
        "Tencent Cloud metadata",
        CloudMetadata,
    ),
    r4(
        [169, 254, 169, 254],
        32,
        "AWS, GCP, Azure, Oracle, DigitalOcean, OpenStack metadata",
        CloudMetadata,
    ),
    r4(
        [169, 254, 170, 2],
        32,
        "AWS ECS task metadata",
        CloudMetadata,
    ),
    r4(
        [169, 254, 170, 23],
        32,
        "AWS EKS Pod Identity",
        CloudMetadata,
    ),
    r4([172, 16, 0, 0], 12, "RFC 1918", Private),
    r4(
        [192, 0, 0, 0],
        24,
        "IETF protocol assignments",
        ProtocolAssignment,
    ),
    r4([192, 0, 0, 192], 32, "Oracle Cloud metadata", CloudMetadata),
    r4([192, 0, 2, 0], 24, "TEST-NET-1", Documentation),
    r4(
        [192, 88, 99, 0],
        24,
        "deprecated 6to4 relay anycast",
        Reserved,
    ),
    r4([192, 168, 0, 0], 16, "RFC 1918", Private),
    r4([198, 18, 0, 0], 15, "benchmarking", Benchmarking),
    r4([198, 51, 100, 0], 24, "TEST-NET-2", Documentation),
    r4([203, 0, 113, 0], 24, "TEST-NET-3", Documentation),
    r4([224, 0, 0, 0], 4, "IPv4 multicast", Multicast),
    r4([240, 0, 0, 0], 4, "reserved for future use", Reserved),
    r4([255, 255, 255, 255], 32, "limited broadcast", Broadcast),
    r6(
        [0, 0, 0, 0, 0, 0, 0, 0],
        128,
        "IPv6 unspecified",
        Unspecified,
    ),
    r6([0, 0, 0, 0, 0, 0, 0, 1], 128, "IPv6 loopback", Loopback),
    r6(
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "RFC 8215",
        LocalUseNat64,
    ),
    r6([0x100, 0, 0, 0, 0, 0, 0, 0], 64, "discard-only", Reserved),
    r6(
        [0x2001, 2, 0, 0, 0, 0, 0, 0],
        48,
        "benchmarking",
        Benchmarking,
    ),
    r6(
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        "IPv6 documentation",
        Documentation,
    ),
    r6(
        [0x3fff, 0, 0, 0, 0, 0, 0, 0],
        20,
        "IPv6 documentation",
        Documentation,
    ),
    r6(
        [0xfc00, 0, 0, 0, 0, 0, 0, 0],
        7,
        "unique-local",
        UniqueLocal,
    ),
    r6(
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23],
        128,
        "AWS EKS Pod Identity over IPv6",
        CloudMetadata,
    ),
    r6(
        [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254],
        128,
        "AWS metadata over IPv6",
        CloudMetadata,
    ),
    r6(
        [0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254],
        128,
        "GCP metadata over IPv6",
        CloudMetadata,
    ),
    r6(
        [0xfe80, 0, 0, 0, 0, 0, 0, 0],
        10,
        "IPv6 link-local",
        LinkLocal,
    ),
    r6(
        [0xfec0, 0, 0, 0, 0, 0, 0, 0],
        10,
        "deprecated site-local",
        Reserved,
    ),
    r6(
        [0xff00, 0, 0, 0, 0, 0, 0, 0],
        8,
        "IPv6 multicast",
        Multicast,
    ),
];

/// Host names of metadata services, refused before they are resolved (their
/// addresses are in [`RANGES`] too, for names that lead there otherwise).
pub const METADATA_HOSTS: &[(&str, &str)] = &[
    ("metadata.google.internal", "GCP metadata"),
    ("metadata.goog", "GCP metadata"),
    ("metadata", "GCP metadata (short name)"),
    ("instance-data", "AWS metadata"),
    ("instance-data.ec2.internal", "AWS metadata"),
    ("metadata.tencentyun.com", "Tencent Cloud metadata"),
];

/// A form of IPv6 address that carries an IPv4 address.
#[derive(Debug)]
pub struct Embedding {
    /// Where the form lives.
    pub net: Net,
    /// Its name.
    pub name: &'static str,
    /// The IPv4 address carried, if the address has one.
    pub carried: fn(Ipv6Addr) -> Option<Ipv4Addr>,
}

fn last_32(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::from_bits(v6.to_bits() as u32))
}

/// `::a.b.c.d`, but not `::` and `::1` (which are themselves).
fn compatible(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    last_32(v6).filter(|v4| v4.to_bits() > 1)
}

/// 6to4: the IPv4 address is bits 16..48.
fn six_to_four(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::from_bits((v6.to_bits() >> 80) as u32))
}

/// Teredo: the client's IPv4 address is the last 32 bits, inverted.
fn teredo(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    Some(Ipv4Addr::from_bits(!(v6.to_bits() as u32)))
}

/// ISATAP: any prefix, an interface identifier of `0:5efe` (`200:5efe`
/// for a global IPv4 address) then the IPv4 address in the last 32 bits.
fn isatap(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    // The IID's universal/local bit (0x0200 of its first group) may be set.
    let iid_high = (v6.to_bits() >> 32) as u32;
    (iid_high & !0x0200_0000 == 0x0000_5efe).then(|| Ipv4Addr::from_bits(v6.to_bits() as u32))
}

/// Every form of IPv6 address that carries an IPv4 address. ISATAP, which
/// has no prefix of its own, is the `::/0` entry: every more specific form
/// goes first.
pub const EMBEDDINGS: &[Embedding] = &[
    Embedding {
        net: Net::v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96),
        name: "IPv4-mapped",
        carried: last_32,
    },
    Embedding {
        net: Net::v6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96),
        name: "IPv4-translated",
        carried: last_32,
    },
    Embedding {
        net: Net::v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        name: "IPv4-compatible",
        carried: compatible,
    },
    Embedding {
        net: Net::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
        name: "NAT64",
        carried: last_32,
    },
    // Local-use NAT64 prefixes can be /48 to /96; /96 is the usual one.
    Embedding {
        net: Net::v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        name: "local-use NAT64",
        carried: last_32,
    },
    Embedding {
        net: Net::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
        name: "6to4",
        carried: six_to_four,
    },
    Embedding {
        net: Net::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
        name: "Teredo",
        carried: teredo,
    },
    Embedding {
        net: Net::v6([0, 0, 0, 0, 0, 0, 0, 0], 0),
        name: "ISATAP",
        carried: isatap,
    },
];

/// The most specific range holding `ip`.
pub fn range_of(ip: IpAddr) -> Option<&'static Range> {
    RANGES
        .iter()
        .filter(|r| r.net.contains(ip))
        .max_by_key(|r| r.net.len)
}

/// The IPv4 address an IPv6 address carries, and the form carrying it.
pub fn carried_ipv4(v6: Ipv6Addr) -> Option<(Ipv4Addr, &'static Embedding)> {
    EMBEDDINGS
        .iter()
        .filter(|e| e.net.contains(IpAddr::V6(v6)))
        .max_by_key(|e| e.net.len)
        .and_then(|e| (e.carried)(v6).map(|v4| (v4, e)))
}

/// Why the policy refuses an address.
#[derive(Debug)]
pub struct Refusal {
    /// The address judged.
    pub ip: IpAddr,
    /// The IPv4 address it carries, when that is what was refused.
    pub carried: Option<(Ipv4Addr, &'static Embedding)>,
    /// The range refused.
    pub range: &'static Range,
}

impl Refusal {
    /// "a loopback address (IPv4 loopback 127.0.0.0/8), refused because …".
    fn what(&self) -> String {
        let why = match self.range.class.rule() {
            Rule::Always => "",
            Rule::UnlessAllowLinkLocal => ", refused unless allow_link_local is set",
            Rule::WhenBlockPrivate => ", refused because block_private is set",
        };
        format!(
            "{} ({} {}){why}",
            self.range.class.described(),
            self.range.name,
            self.range.net
        )
    }

    /// The refusal of an address a host name resolved to.
    pub fn of_host(&self, host: &str) -> String {
        match self.carried {
            None => format!("{host} is {}, {}", self.ip, self.what()),
            Some((v4, e)) => format!(
                "{host} is {} ({} {}), which carries {v4}, {}",
                self.ip,
                e.name,
                e.net,
                self.what()
            ),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.carried {
            None => write!(f, "{} is {}", self.ip, self.what()),
            Some((v4, e)) => write!(
                f,
                "{} ({} {}) carries {v4}, {}",
                self.ip,
                e.name,
                e.net,
                self.what()
            ),
        }
    }
}

/// Why `ip` is refused under `cfg`; `None` when it is allowed. An IPv6
/// address carrying an IPv4 address is judged as that address first, then
/// as itself.
pub fn judge(ip: IpAddr, cfg: &WebhookConfig) -> Option<Refusal> {
    if let IpAddr::V6(v6) = ip
        && let Some((v4, form)) = carried_ipv4(v6)
        && let Some(range) = range_of(IpAddr::V4(v4)).filter(|r| r.class.refused(cfg))
    {
        return Some(Refusal {
            ip,
            carried: Some((v4, form)),
            range,
        });
    }
    range_of(ip)
        .filter(|r| r.class.refused(cfg))
        .map(|range| Refusal {
            ip,
            carried: None,
            range,
        })
}

/// Why a host name is refused before it is resolved (metadata services).
pub fn judge_host(host: &str) -> Option<String> {
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    METADATA_HOSTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, what)| format!("{host} is a cloud metadata host name ({what}: {n})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn configs() -> [(&'static str, WebhookConfig); 3] {
        [
            ("default", WebhookConfig::default()),
            (
                "block_private",
                WebhookConfig {
                    block_private: true,
                    ..WebhookConfig::default()
                },
            ),
            (
                "allow_link_local",
                WebhookConfig {
                    allow_link_local: true,
                    ..WebhookConfig::default()
                },
            ),
        ]
    }

    fn step(ip: IpAddr, up: bool) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(v4) => {
                let b = v4.to_bits();
                let n = if up {
                    b.checked_add(1)
                } else {
                    b.checked_sub(1)
                };
                n.map(|n| IpAddr::V4(Ipv4Addr::from_bits(n)))
            }
            IpAddr::V6(v6) => {
                let b = v6.to_bits();
                let n = if up {
                    b.checked_add(1)
                } else {
                    b.checked_sub(1)
                };
                n.map(|n| IpAddr::V6(Ipv6Addr::from_bits(n)))
            }
        }
    }

    #[test]
    fn every_network_is_written_without_host_bits() {
        for r in RANGES {
            assert_eq!(r.net.bounds().0, r.net.addr, "{} {}", r.name, r.net);
        }
        for e in EMBEDDINGS {
            assert_eq!(e.net.bounds().0, e.net.addr, "{} {}", e.name, e.net);
        }
    }

    /// The address nearest `from` (walking up or down) that is this range's
    /// own, not a more specific range's nested in it (255.255.255.255 in
    /// 240.0.0.0/4).
    fn own_address(r: &Range, from: IpAddr, up: bool) -> IpAddr {
        let mut a = from;
        for _ in 0..1000 {
            if range_of(a).map(|f| f.net) == Some(r.net) {
                return a;
            }
            a = step(a, up).unwrap();
        }
        panic!("{} has no address of its own near {from}", r.net);
    }

    /// Every named range: its first and last addresses (of its own) take
    /// its class and are refused exactly as its rule says; the addresses
    /// just outside it are some other range's (or none).
    #[test]
    fn every_named_range_inside_and_just_outside() {
        for r in RANGES {
            let (first, last) = r.net.bounds();
            for inside in [own_address(r, first, true), own_address(r, last, false)] {
                let found = range_of(inside).map(|f| f.net);
                assert_eq!(found, Some(r.net), "{inside} should be in {}", r.net);
                for (name, cfg) in configs() {
                    let expected = r.class.refused(&cfg);
                    let got = judge(inside, &cfg);
                    // Inside a range, an address may still carry a refused IPv4.
                    if got.as_ref().is_some_and(|g| g.carried.is_some()) {
                        continue;
                    }
                    assert_eq!(got.is_some(), expected, "{inside} ({}) with {name}", r.name);
                    if let Some(g) = got {
                        let text = g.to_string();
                        assert!(text.contains(r.class.described()), "{text}");
                        assert!(text.contains(&r.net.to_string()), "{text}");
                    }
                }
            }
            for outside in [step(first, false), step(last, true)].into_iter().flatten() {
                let found = range_of(outside).map(|f| f.net);
                assert_ne!(found, Some(r.net), "{outside} is outside {}", r.net);
            }
        }
    }

    /// The IPv4 addresses each form carries, for 169.254.169.254.
    fn carrying_metadata() -> Vec<(&'static str, &'static str)> {
        vec![
            ("IPv4-mapped", "::ffff:169.254.169.254"),
            ("IPv4-translated", "::ffff:0:169.254.169.254"),
            ("IPv4-compatible", "::169.254.169.254"),
            ("NAT64", "64:ff9b::a9fe:a9fe"),
            ("local-use NAT64", "64:ff9b:1:2:3:4:a9fe:a9fe"),
            ("6to4", "2002:a9fe:a9fe::1"),
            // Teredo: server 65.54.227.120, client 169.254.169.254 inverted.
            ("Teredo", "2001:0:4136:e378:8000:63bf:5601:5601"),
            ("ISATAP", "2001:db8:1:2:0:5efe:a9fe:a9fe"),
            ("ISATAP", "2a00:1450::200:5efe:169.254.169.254"),
        ]
    }

    #[test]
    fn every_embedding_is_judged_as_the_ipv4_address_it_carries() {
        let open = WebhookConfig::default();
        let shared = WebhookConfig {
            block_private: true,
            ..WebhookConfig::default()
        };
        for (form, text) in carrying_metadata() {
            let r = judge(ip(text), &open).unwrap_or_else(|| panic!("{form} {text} passed"));
            let (v4, e) = r.carried.unwrap();
            assert_eq!((v4, e.name), (Ipv4Addr::new(169, 254, 169, 254), form));
            let msg = r.to_string();
            assert!(
                msg.contains("carries 169.254.169.254, a cloud metadata address"),
                "{msg}"
            );
        }
        // The same forms carrying a private address: refused with
        // block_private only; carrying a public one: allowed.
        for (form, private, public) in [
            ("IPv4-mapped", "::ffff:10.1.2.3", "::ffff:93.184.216.34"),
            (
                "IPv4-translated",
                "::ffff:0:10.1.2.3",
                "::ffff:0:93.184.216.34",
            ),
            ("IPv4-compatible", "::10.1.2.3", "::93.184.216.34"),
            ("NAT64", "64:ff9b::a01:203", "64:ff9b::5db8:d822"),
            ("6to4", "2002:a01:203::1", "2002:5db8:d822::1"),
            (
                "Teredo",
                "2001:0:4136:e378:8000:63bf:f5fe:fdfc",
                "2001:0:4136:e378:8000:63bf:a247:27dd",
            ),
            (
                "ISATAP",
                "2a00:1450::5efe:10.1.2.3",
                "2a00:1450::200:5efe:93.184.216.34",
            ),
        ] {
            assert!(judge(ip(private), &open).is_none(), "{form} {private}");
            let r = judge(ip(private), &shared).unwrap_or_else(|| panic!("{form} {private}"));
            assert_eq!(r.carried.unwrap().0, Ipv4Addr::new(10, 1, 2, 3), "{form}");
            assert!(r.to_string().contains("block_private"), "{r}");
            assert!(judge(ip(public), &shared).is_none(), "{form} {public}");
        }
        // The local-use NAT64 prefix is itself private: its /96 form is
        // judged by what it carries, the rest with block_private.
        assert!(judge(ip("64:ff9b:1::5db8:d822"), &open).is_none());
        let r = judge(ip("64:ff9b:1::5db8:d822"), &shared).unwrap();
        assert_eq!(r.range.class, LocalUseNat64);
    }

    #[test]
    fn just_outside_each_embedding_nothing_is_carried() {
        for (outside, why) in [
            ("::fffe:a9fe:a9fe", "below IPv4-mapped"),
            ("::1:0:a9fe:a9fe", "above IPv4-mapped"),
            ("64:ff9b::1:a9fe:a9fe", "outside NAT64 /96"),
            ("64:ff9a:ffff:ffff:ffff:ffff:a9fe:a9fe", "below NAT64"),
            ("64:ff9b:2::a9fe:a9fe", "above local-use NAT64"),
            ("2003:a9fe:a9fe::1", "above 6to4"),
            ("2001:1::5601:5601", "above Teredo"),
            ("2a00:1450::100:5efe:a9fe:a9fe", "not an ISATAP identifier"),
            (
                "2a00:1450::1:5efe:a9fe:a9fe",
                "not an ISATAP identifier either",
            ),
            ("2a00:1450::5eff:a9fe:a9fe", "next to ISATAP's 5efe"),
        ] {
            assert!(carried_ipv4(outside.parse().unwrap()).is_none(), "{why}");
            assert!(
                judge(ip(outside), &WebhookConfig::default()).is_none(),
                "{why}"
            );
        }
        // :: and ::1 are themselves, not IPv4-compatible 0.0.0.0 and 0.0.0.1.
        assert!(carried_ipv4(Ipv6Addr::UNSPECIFIED).is_none());
        assert!(carried_ipv4(Ipv6Addr::LOCALHOST).is_none());
        assert!(judge(ip("::1"), &WebhookConfig::default()).is_none());
    }

    /// The holes of issue 13, and their messages.
    #[test]
    fn the_reported_holes_are_closed() {
        let open = WebhookConfig::default();
        let shared = WebhookConfig {
            block_private: true,
            ..WebhookConfig::default()
        };
        for (addr, cfg, says) in [
            (
                "fd00:ec2::254",
                &open,
                "a cloud metadata address (AWS metadata over IPv6 fd00:ec2::254/128)",
            ),
            (
                "100.100.100.200",
                &open,
                "a cloud metadata address (Alibaba Cloud metadata",
            ),
            (
                "2002:a9fe:a9fe::",
                &open,
                "carries 169.254.169.254, a cloud metadata address",
            ),
            (
                "2002:7f00:1::",
                &shared,
                "carries 127.0.0.1, a loopback address",
            ),
            (
                "64:ff9b::a9fe:a9fe",
                &shared,
                "64:ff9b::a9fe:a9fe (NAT64 64:ff9b::/96) carries 169.254.169.254, a cloud metadata address",
            ),
            ("169.254.170.2", &open, "AWS ECS task metadata"),
            ("192.0.0.192", &open, "Oracle Cloud metadata"),
            (
                "100.64.0.1",
                &shared,
                "a CGNAT (shared) address (carrier-grade NAT 100.64.0.0/10), refused because block_private is set",
            ),
            (
                "169.254.1.1",
                &open,
                "a link-local address (IPv4 link-local 169.254.0.0/16), refused unless allow_link_local is set",
            ),
            ("fe80::1", &open, "a link-local address"),
            ("0.0.0.0", &open, "an unspecified address"),
            ("::", &open, "an unspecified address"),
            ("255.255.255.255", &open, "the broadcast address"),
            ("239.1.2.3", &open, "a multicast address"),
            ("ff02::1", &open, "a multicast address"),
        ] {
            let r = judge(ip(addr), cfg).unwrap_or_else(|| panic!("{addr} passed"));
            assert!(r.to_string().contains(says), "{addr}: {r}");
        }
        // Metadata stays refused when link-local is allowed.
        let ll = WebhookConfig {
            allow_link_local: true,
            ..WebhookConfig::default()
        };
        assert!(judge(ip("169.254.1.1"), &ll).is_none());
        assert!(judge(ip("169.254.169.254"), &ll).is_some());
        assert!(judge(ip("::ffff:169.254.169.254"), &ll).is_some());
        // Loopback and private are allowed by default, refused when shared.
        for a in [
            "127.0.0.1",
            "::1",
            "10.0.0.1",
            "192.168.1.1",
            "fd12::1",
            "100.64.0.1",
        ] {
            assert!(judge(ip(a), &open).is_none(), "{a}");
            assert!(judge(ip(a), &shared).is_some(), "{a}");
        }
        for a in ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"] {
            assert!(judge(ip(a), &shared).is_none(), "{a}");
        }
    }

    #[test]
    fn metadata_host_names_are_refused_by_name() {
        for h in [
            "metadata.google.internal",
            "METADATA.google.internal.",
            "metadata",
            "instance-data",
        ] {
            let why = judge_host(h).unwrap_or_else(|| panic!("{h} passed"));
            assert!(why.contains("cloud metadata host name"), "{why}");
        }
        for h in ["metadata.example.com", "google.internal", "localhost"] {
            assert!(judge_host(h).is_none(), "{h}");
        }
    }
}

//! Which roles a host takes: the `--role` names given, or every role whose
//! `hosts` contains an address of the attached interface.

use std::net::IpAddr;

use super::Policy;

/// Why the host's roles could not be determined.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoleError {
    /// `--role` named a role the policy does not define.
    #[error("{file}: unknown role `{name}`{hint} (roles defined: {known})")]
    Unknown {
        /// Policy file.
        file: String,
        /// The name given.
        name: String,
        /// `; did you mean `admins`?` when a defined role is close, else empty.
        hint: String,
        /// Defined roles, comma separated.
        known: String,
    },
    /// No role's `hosts` contains an address of the interface.
    #[error(
        "{file}: no role matches interface {iface} (addresses: {addrs}); roles and their hosts: {roles}; pass --role NAME to choose one"
    )]
    NoneMatch {
        /// Policy file.
        file: String,
        /// Interface.
        iface: String,
        /// Its addresses, comma separated.
        addrs: String,
        /// `role=hosts` pairs.
        roles: String,
    },
}

/// Resolves the host's roles. `explicit` wins when non-empty; otherwise the
/// roles whose `hosts` contain one of `addrs` (the interface's addresses).
pub fn resolve(
    policy: &Policy,
    explicit: &[String],
    iface: &str,
    addrs: &[IpAddr],
) -> Result<Vec<String>, RoleError> {
    if !explicit.is_empty() {
        let mut out = Vec::new();
        for name in explicit {
            if policy.role(name).is_none() {
                let hint =
                    super::error::did_you_mean(name, policy.roles.iter().map(|r| r.name.as_str()));
                return Err(RoleError::Unknown {
                    file: policy.source.clone(),
                    name: name.clone(),
                    hint: hint.map(|h| format!("; {h}")).unwrap_or_default(),
                    known: policy
                        .roles
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        return Ok(out);
    }
    let found: Vec<String> = policy
        .roles
        .iter()
        .filter(|r| r.hosts.iter().any(|h| addrs.iter().any(|a| h.contains(*a))))
        .map(|r| r.name.clone())
        .collect();
    if found.is_empty() {
        return Err(RoleError::NoneMatch {
            file: policy.source.clone(),
            iface: iface.to_string(),
            addrs: if addrs.is_empty() {
                "none".to_string()
            } else {
                addrs
                    .iter()
                    .map(std::string::ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            roles: policy
                .roles
                .iter()
                .map(|r| format!("{}={}", r.name, r.hosts_text.as_deref().unwrap_or("(none)")))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Policy {
        Policy::from_str(include_str!("../../../examples/roles.toml"), "roles.toml").unwrap()
    }

    #[test]
    fn roles_from_addresses() {
        let p = example();
        let got = resolve(&p, &[], "eth1", &["10.10.1.31".parse().unwrap()]).unwrap();
        assert_eq!(got, vec!["db".to_string()]);
        let got = resolve(&p, &[], "eth1", &["fd00:10:1::3f".parse().unwrap()]).unwrap();
        assert_eq!(got, vec!["db".to_string()]);
    }

    #[test]
    fn no_role_lists_addresses_and_sets() {
        let p = example();
        let e = resolve(&p, &[], "eth1", &["192.0.2.1".parse().unwrap()]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("192.0.2.1"), "{msg}");
        assert!(msg.contains("web=web_nodes"), "{msg}");
    }

    #[test]
    fn explicit_roles_are_checked() {
        let p = example();
        assert_eq!(
            resolve(&p, &["app".into()], "x", &[]).unwrap(),
            vec!["app".to_string()]
        );
        assert!(matches!(
            resolve(&p, &["nope".into()], "x", &[]),
            Err(RoleError::Unknown { .. })
        ));
        let msg = resolve(&p, &["ap".into()], "x", &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("unknown role `ap`; did you mean `app`?"),
            "{msg}"
        );
    }
}

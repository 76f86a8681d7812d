use std::fmt;

/// Who is asking: the identity the connector derived from a verified client
/// certificate. Policies match on these attributes; budgets and quotas are
/// keyed to [`Principal::organization`] so that a fresh certificate for the
/// same organization gets no fresh allowance.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    /// Stable identifier: the first SAN URI of the certificate
    /// (e.g. `spiffe://city.example/org/planning`), else `O=<org>,CN=<cn>`.
    pub id: String,
    /// Subject organization (O), when the certificate has one.
    pub organization: Option<String>,
    /// Subject common name (CN), when the certificate has one.
    pub common_name: Option<String>,
    /// All URI subject alternative names, in certificate order.
    pub san_uris: Vec<String>,
    /// The broker that relayed this principal's query (its own verified
    /// certificate), when the query came through one; `None` for direct
    /// callers. Policies decide relayed queries for both (`brokers:`).
    pub via: Option<Box<Principal>>,
}

impl Principal {
    /// A principal known only by its identifier (tests, examples).
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            organization: None,
            common_name: None,
            san_uris: Vec::new(),
            via: None,
        }
    }

    /// This principal as if it asked directly (without its broker).
    pub fn direct(&self) -> Principal {
        Principal {
            via: None,
            ..self.clone()
        }
    }

    /// This principal as relayed by `broker`.
    pub fn relayed_by(mut self, broker: Principal) -> Self {
        self.via = Some(Box::new(broker));
        self
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)?;
        if let Some(broker) = &self.via {
            write!(f, " (via {broker})")?;
        }
        Ok(())
    }
}

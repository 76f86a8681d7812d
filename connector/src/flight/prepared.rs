//! Prepared statements: a planned query with parameter placeholders, held
//! for the principal that created it until it is closed or left idle.
//!
//! The handle is 16 random bytes; a handle presented by anyone but its owner
//! is treated exactly like an unknown handle.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::Schema;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::LogicalPlan;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::TenantCaps;
use crate::query::QueryError;
use crate::query::ticket::check_caps;

/// A prepared statement is dropped after this long without use.
const IDLE_TTL: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct PreparedStatement {
    pub principal_id: String,
    /// The organization it counts against.
    pub organization: String,
    /// The planned statement, placeholders unbound.
    pub plan: LogicalPlan,
    pub parameter_schema: Schema,
    /// Values bound by the latest DoPut, if any.
    pub params: Option<Vec<ScalarValue>>,
    last_used: Instant,
}

/// Open statements, capped per principal, per organization and in all.
pub struct PreparedStatements {
    inner: Mutex<HashMap<[u8; 16], PreparedStatement>>,
    caps: TenantCaps,
}

impl PreparedStatements {
    pub fn new(caps: TenantCaps) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            caps,
        }
    }

    pub fn create(
        &self,
        principal_id: &str,
        organization: &str,
        plan: LogicalPlan,
        parameter_schema: Schema,
    ) -> Result<Vec<u8>, QueryError> {
        let mut handle = [0u8; 16];
        SystemRandom::new()
            .fill(&mut handle)
            .map_err(|_| QueryError::Internal("the system random source failed".into()))?;
        let now = Instant::now();
        let mut map = self.inner.lock().expect("prepared statements lock");
        map.retain(|_, s| now.duration_since(s.last_used) < IDLE_TTL);
        let (mut by_organization, mut by_principal) = (0, 0);
        for statement in map.values() {
            by_organization += usize::from(statement.organization == organization);
            by_principal += usize::from(statement.principal_id == principal_id);
        }
        check_caps(&self.caps, (map.len(), by_organization, by_principal))?;
        map.insert(
            handle,
            PreparedStatement {
                principal_id: principal_id.to_string(),
                organization: organization.to_string(),
                plan,
                parameter_schema,
                params: None,
                last_used: now,
            },
        );
        Ok(handle.to_vec())
    }

    /// A copy of the statement, if `principal_id` owns it.
    pub fn get(&self, handle: &[u8], principal_id: &str) -> Result<PreparedStatement, QueryError> {
        self.with(handle, principal_id, |s| s.clone())
    }

    /// Replaces the bound parameter values.
    pub fn bind(
        &self,
        handle: &[u8],
        principal_id: &str,
        values: Vec<ScalarValue>,
    ) -> Result<(), QueryError> {
        self.with(handle, principal_id, |s| s.params = Some(values))
    }

    pub fn close(&self, handle: &[u8], principal_id: &str) -> Result<(), QueryError> {
        let key = key(handle)?;
        let mut map = self.inner.lock().expect("prepared statements lock");
        match map.get(&key) {
            Some(s) if s.principal_id == principal_id => {
                map.remove(&key);
                Ok(())
            }
            _ => Err(unknown()),
        }
    }

    fn with<T>(
        &self,
        handle: &[u8],
        principal_id: &str,
        f: impl FnOnce(&mut PreparedStatement) -> T,
    ) -> Result<T, QueryError> {
        let key = key(handle)?;
        let mut map = self.inner.lock().expect("prepared statements lock");
        match map.get_mut(&key) {
            Some(s) if s.principal_id == principal_id => {
                s.last_used = Instant::now();
                Ok(f(s))
            }
            _ => Err(unknown()),
        }
    }
}

fn key(handle: &[u8]) -> Result<[u8; 16], QueryError> {
    handle.try_into().map_err(|_| unknown())
}

fn unknown() -> QueryError {
    QueryError::NotFound(
        "unknown prepared statement handle (closed, expired, or never created)".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::LogicalPlanBuilder;

    fn plan() -> LogicalPlan {
        LogicalPlanBuilder::empty(false).build().unwrap()
    }

    fn caps(per_principal: usize, per_organization: usize, total: usize) -> TenantCaps {
        TenantCaps {
            per_principal,
            per_organization,
            total,
            ..crate::config::Limits::default().prepared_statements
        }
    }

    #[test]
    fn capped_per_principal_per_organization_and_in_all() {
        let store = PreparedStatements::new(caps(2, 3, 4));
        let create = |who: &str, org: &str| store.create(who, org, plan(), Schema::empty());
        create("a1", "A").unwrap();
        create("a1", "A").unwrap();
        let e = create("a1", "A").unwrap_err();
        assert!(e.to_string().contains("by this principal"), "{e}");
        create("a2", "A").unwrap();
        let e = create("a3", "A").unwrap_err();
        assert!(e.to_string().contains("by this organization"), "{e}");
        create("b1", "B").unwrap();
        let e = create("c1", "C").unwrap_err();
        assert!(e.to_string().contains("all clients"), "{e}");
    }

    #[test]
    fn owner_only_and_capped() {
        let store = PreparedStatements::new(caps(1, 10, 10));
        let h = store.create("alice", "A", plan(), Schema::empty()).unwrap();
        assert!(store.get(&h, "alice").is_ok());
        assert!(matches!(
            store.get(&h, "mallory"),
            Err(QueryError::NotFound(_))
        ));
        assert!(matches!(
            store.close(&h, "mallory"),
            Err(QueryError::NotFound(_))
        ));
        assert!(matches!(
            store.create("alice", "A", plan(), Schema::empty()),
            Err(QueryError::ResourcesExhausted(_))
        ));
        store
            .bind(&h, "alice", vec![ScalarValue::Int64(Some(1))])
            .unwrap();
        assert_eq!(store.get(&h, "alice").unwrap().params.unwrap().len(), 1);
        store.close(&h, "alice").unwrap();
        assert!(store.get(&h, "alice").is_err());
    }
}

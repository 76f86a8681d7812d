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

use crate::query::QueryError;

/// A prepared statement is dropped after this long without use.
const IDLE_TTL: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct PreparedStatement {
    pub principal_id: String,
    /// The planned statement, placeholders unbound.
    pub plan: LogicalPlan,
    pub parameter_schema: Schema,
    /// Values bound by the latest DoPut, if any.
    pub params: Option<Vec<ScalarValue>>,
    last_used: Instant,
}

pub struct PreparedStatements {
    inner: Mutex<HashMap<[u8; 16], PreparedStatement>>,
    per_principal: usize,
}

impl PreparedStatements {
    pub fn new(per_principal: usize) -> Self {
        Self {
            inner: Mutex::new(HashMap::new()),
            per_principal,
        }
    }

    pub fn create(
        &self,
        principal_id: &str,
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
        let open = map
            .values()
            .filter(|s| s.principal_id == principal_id)
            .count();
        if open >= self.per_principal {
            return Err(QueryError::ResourcesExhausted(format!(
                "{open} prepared statements are open for this principal (limits.max_prepared_statements); close some first"
            )));
        }
        map.insert(
            handle,
            PreparedStatement {
                principal_id: principal_id.to_string(),
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

    #[test]
    fn owner_only_and_capped() {
        let store = PreparedStatements::new(1);
        let h = store.create("alice", plan(), Schema::empty()).unwrap();
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
            store.create("alice", plan(), Schema::empty()),
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

//! `sluice.v1.CatalogService`: the datasets and offers the caller's usage
//! policy gives it, in DCAT-like terms. Hidden datasets and columns are
//! absent, and a dataset the caller may not see answers NOT_FOUND exactly as
//! one that does not exist.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use sluice_policy::Principal;
use sluice_policy::document::Visibility;
use sluice_policy::offers::{CatalogColumn, CatalogEntry, Offer};
use sluice_proto::v1 as pb;
use sluice_proto::v1::catalog_service_server::{CatalogService, CatalogServiceServer};
use tonic::{Request, Response, Status};

use crate::identity;
use crate::query::QueryEngine;

const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;

pub struct CatalogDirectory {
    engine: Arc<QueryEngine>,
}

impl CatalogDirectory {
    pub fn new(engine: Arc<QueryEngine>) -> Self {
        Self { engine }
    }

    pub fn into_service(self) -> CatalogServiceServer<Self> {
        CatalogServiceServer::new(self)
    }

    /// Every dataset `principal` may see, by name, as protobuf messages.
    pub(crate) fn visible(&self, principal: &Principal) -> Vec<pb::Dataset> {
        let gate = self.engine.policy().current();
        let Some(policy) = gate.policy_set() else {
            return Vec::new();
        };
        policy
            .catalog(principal)
            .into_iter()
            .filter_map(|entry| {
                let served = self.engine.catalog().dataset(&entry.name)?;
                Some(dataset(entry, served.modified()))
            })
            .collect()
    }
}

#[tonic::async_trait]
impl CatalogService for CatalogDirectory {
    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let principal = identity::direct_principal(&request)?;
        let filter = request.into_inner();
        let page_size = match filter.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        if !filter.classification.is_empty()
            && !["general", "important", "core"].contains(&filter.classification.as_str())
        {
            return Err(Status::invalid_argument(format!(
                "unknown classification `{}`; use general, important or core",
                filter.classification
            )));
        }
        let matching: Vec<pb::Dataset> = self
            .visible(&principal)
            .into_iter()
            .filter(|d| matches(d, &filter))
            .collect();
        // The token is the last name of the previous page: stable while
        // datasets come and go between pages.
        let start = matching
            .iter()
            .position(|d| {
                filter.page_token.is_empty() || d.name.as_str() > filter.page_token.as_str()
            })
            .unwrap_or(matching.len());
        let total = matching.len() as u32;
        let page: Vec<pb::Dataset> = matching.into_iter().skip(start).take(page_size).collect();
        let next_page_token = match start + page.len() < total as usize {
            true => page.last().map(|d| d.name.clone()).unwrap_or_default(),
            false => String::new(),
        };
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: page,
            next_page_token,
            total,
        }))
    }

    async fn get_dataset(
        &self,
        request: Request<pb::GetDatasetRequest>,
    ) -> Result<Response<pb::Dataset>, Status> {
        let principal = identity::direct_principal(&request)?;
        let name = request.into_inner().name;
        self.visible(&principal)
            .into_iter()
            .find(|d| d.name == name)
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no dataset `{name}` is offered to you (ListDatasets shows those that are)"
                ))
            })
    }
}

fn matches(d: &pb::Dataset, filter: &pb::ListDatasetsRequest) -> bool {
    let contains = |text: &str, needle: &str| text.to_lowercase().contains(&needle.to_lowercase());
    let keyword = &filter.keyword;
    (keyword.is_empty()
        || contains(&d.name, keyword)
        || contains(&d.title, keyword)
        || contains(&d.description, keyword)
        || d.keywords.iter().any(|k| contains(k, keyword)))
        && (filter.classification.is_empty() || d.classification == filter.classification)
        && (filter.publisher.is_empty() || contains(&d.publisher, &filter.publisher))
}

fn dataset(entry: CatalogEntry, modified: Option<std::time::SystemTime>) -> pb::Dataset {
    let meta = entry.metadata;
    let under_dp = entry.offers.iter().any(|o| o.dp.is_some());
    let privacy_unit = meta
        .privacy_unit
        .as_ref()
        .filter(|_| under_dp)
        .map(|unit| unit.value.clone())
        .unwrap_or_default();
    pb::Dataset {
        title: meta.title.unwrap_or_else(|| entry.name.clone()),
        name: entry.name,
        description: meta.description.unwrap_or_default(),
        publisher: meta.publisher.unwrap_or_default(),
        keywords: meta.keywords,
        license: meta.license.unwrap_or_default(),
        classification: entry.classification.to_string(),
        modified: modified.map(rfc3339).unwrap_or_default(),
        columns: entry.columns.into_iter().map(column).collect(),
        offers: entry.offers.iter().map(offer).collect(),
        public: meta.public,
        privacy_unit,
    }
}

fn column(c: CatalogColumn) -> pb::Column {
    let (visibility, mask) = match &c.visibility {
        Visibility::Masked(mask) => ("masked".to_string(), mask.to_string()),
        other => (other.to_string(), String::new()),
    };
    pb::Column {
        name: c.field.name().clone(),
        data_type: c.field.data_type().to_string(),
        nullable: c.field.is_nullable(),
        visibility,
        mask,
        classification: c.class.to_string(),
        tags: c.tags.iter().map(ToString::to_string).collect(),
        dp_bounds: c.dp_bounds.map(|b| b.to_vec()).unwrap_or_default(),
        dp_bounds_auto: c.dp_bounds_auto,
    }
}

pub(crate) fn offer(o: &Offer) -> pb::Offer {
    let quotas = o.quotas.unwrap_or_default();
    pb::Offer {
        id: o.id.clone(),
        dataset: o.dataset.clone(),
        mode: o.mode.to_string(),
        purposes: o.purposes.clone(),
        min_group_size: o.min_group_size.unwrap_or(0),
        max_rows: o.max_rows.unwrap_or(0),
        dp: o.dp.as_ref().map(|dp| pb::DpTerms {
            epsilon_per_query: dp.epsilon_cap,
            default_epsilon: dp.default_epsilon,
            delta_per_query: dp.delta_per_query,
            budget_epsilon: dp.budget.as_ref().map_or(0.0, |b| b.epsilon),
            budget_delta: dp.budget.as_ref().map_or(0.0, |b| b.delta),
            budget_period: dp
                .budget
                .as_ref()
                .map(|b| b.period.to_string())
                .unwrap_or_default(),
            // 0 stands for `auto`: the number is chosen per query.
            max_groups: if dp.auto.max_groups { 0 } else { dp.max_groups },
            max_rows: if dp.auto.max_rows { 0 } else { dp.max_rows },
            noise: format!("{:?}", dp.noise).to_lowercase(),
            min_epsilon_per_query: dp.min_epsilon,
        }),
        valid_from: o
            .valid_from
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_default(),
        valid_until: o
            .valid_until
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
            .unwrap_or_default(),
        agreement: match &o.agreement {
            None => "none".into(),
            Some(terms) => terms.approval.to_string(),
        },
        agreement_duration_seconds: o
            .agreement
            .as_ref()
            .and_then(|t| t.valid_for_days)
            .map_or(0, |days| u64::from(days) * 86_400),
        queries_per_day: quotas.queries_per_day.unwrap_or(0),
        rows_per_day: quotas.rows_per_day.unwrap_or(0),
        guarantee: o.guarantee(),
    }
}

pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Millis, true)
}

//! Differential privacy: the `dp` block of a grant ([`settings`]) and the
//! plan that answers an aggregate query with bounded contributions
//! ([`plan`]). Noise, the budget ledger and the release are the connector's.

pub mod auto;
pub mod grid_positions;
pub mod period;
pub mod plan;
pub mod settings;
pub mod top_groups;
pub mod zcdp;

pub use auto::{AutoBounds, AutoChoice, AutoKind, Chosen, ChosenBounds};
pub use period::{MAX_WINDOW_DAYS, Period, PeriodError};
pub use plan::{
    BiasKind, BiasStatistic, DpQuery, Groups, OutputKind, SUPPORTED, Statistic, StatisticKind,
    ZcdpCost,
};
pub use settings::{Accounting, Budget, ColumnBounds, DpGrant};

//! `top_groups(cell)`: the aggregate that keeps each privacy unit's
//! `max_groups` largest groups, inside the `GROUP BY unit` hash aggregation.
//!
//! It replaces a `ROW_NUMBER() OVER (PARTITION BY unit ORDER BY rows DESC,
//! keys)` window, which sorted the whole per-(unit, group) table (about 70%
//! of a DP query's time at 10M rows). Here each unit keeps at most `k`
//! candidates while the cells stream past, so the work is linear in the
//! cells and the memory is the kept cells.
//!
//! The input is one struct per (unit, group) cell: the group keys first,
//! the cell's raw row count at a known field, then whatever statistics the
//! plan carries. The output, per unit, is the list of kept cells, best
//! first, each with one more field, [`DROPPED`]: the rows of the unit's
//! cells that were *not* kept, on the first cell of the list (0 on the
//! others), so that a plain sum over all kept cells counts each unit's
//! dropped rows once.
//!
//! The order is the window's: more rows first, then the keys ascending with
//! NULL last. It depends only on the unit's own cells (never on the order in
//! which they arrive or how they are partitioned), which is what keeps the
//! sensitivity a fact of the plan.

use std::cmp::Ordering;
use std::sync::Arc;

use datafusion_common::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, ListArray, StructArray,
};
use datafusion_common::arrow::buffer::OffsetBuffer;
use datafusion_common::arrow::compute::{SortOptions, interleave};
use datafusion_common::arrow::datatypes::{DataType, Field, FieldRef, Fields, Int64Type};
use datafusion_common::arrow::row::{RowConverter, Rows, SortField};
use datafusion_common::{Result, ScalarValue, exec_err, plan_err};
use datafusion_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion_expr::utils::format_state_name;
use datafusion_expr::{
    Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

/// The aggregate's function name, which execution looks for in a plan.
pub const NAME: &str = "sluice_top_groups";

/// The field added to every output cell: rows of the unit's dropped cells.
pub const DROPPED: &str = "__sluice_dropped";

/// The aggregate (see the module docs).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TopGroups {
    signature: Signature,
    /// Cells kept per unit (`max_groups`).
    k: usize,
    /// The first `key_fields` fields of the cell are the group keys.
    key_fields: usize,
    /// The field holding the cell's raw row count (`Int64`).
    rows_field: usize,
}

impl TopGroups {
    pub fn new(k: usize, key_fields: usize, rows_field: usize) -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
            k: k.max(1),
            key_fields,
            rows_field,
        }
    }

    /// The output cell type: the input's fields and [`DROPPED`].
    fn output_fields(&self, input: &DataType) -> Result<Fields> {
        let DataType::Struct(fields) = input else {
            return plan_err!("top_groups takes a struct, not {input}");
        };
        let rows_ok = fields
            .get(self.rows_field)
            .is_some_and(|f| *f.data_type() == DataType::Int64);
        if !rows_ok || fields.len() <= self.key_fields {
            return plan_err!("top_groups: the cell has no Int64 row count where expected");
        }
        let mut out: Vec<FieldRef> = fields.iter().cloned().collect();
        out.push(Arc::new(Field::new(DROPPED, DataType::Int64, false)));
        Ok(Fields::from(out))
    }

    fn accumulator_for(&self, input: &DataType) -> Result<TopGroupsAccumulator> {
        let fields = self.output_fields(input)?;
        let sort = SortOptions {
            descending: false,
            nulls_first: false,
        };
        let converter = RowConverter::new(
            fields
                .iter()
                .take(self.key_fields)
                .map(|f| SortField::new_with_options(f.data_type().clone(), sort))
                .collect(),
        )?;
        Ok(TopGroupsAccumulator {
            k: self.k,
            key_fields: self.key_fields,
            rows_field: self.rows_field,
            fields,
            converter,
            stored: Vec::new(),
            tops: Vec::new(),
            dropped: Vec::new(),
            stored_cells: 0,
            live_cells: 0,
            stored_bytes: 0,
        })
    }
}

impl AggregateUDFImpl for TopGroups {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        let Some(input) = args.first() else {
            return plan_err!("top_groups takes one struct");
        };
        let fields = self.output_fields(input)?;
        Ok(DataType::new_list(DataType::Struct(fields), false))
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let input = args.exprs[0].data_type(args.schema)?;
        Ok(Box::new(OneUnit(self.accumulator_for(&input)?)))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        // The state is the output: a partial list of kept cells.
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "cells"),
            args.return_field.data_type().clone(),
            false,
        ))])
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let input = args.exprs[0].data_type(args.schema)?;
        Ok(Box::new(self.accumulator_for(&input)?))
    }
}

/// One kept candidate: its raw rows and where its cell is stored.
#[derive(Debug, Clone, Copy)]
struct Entry {
    rows: i64,
    batch: u32,
    row: u32,
}

/// A batch of cells (output type) and their keys in comparable form.
struct Stored {
    cells: ArrayRef,
    keys: Rows,
}

struct TopGroupsAccumulator {
    k: usize,
    key_fields: usize,
    rows_field: usize,
    /// Output cell fields (input fields and [`DROPPED`]).
    fields: Fields,
    converter: RowConverter,
    stored: Vec<Stored>,
    /// Per unit: at most `k` entries, unordered until emitted.
    tops: Vec<Vec<Entry>>,
    /// Per unit: rows of the cells not kept.
    dropped: Vec<i64>,
    stored_cells: usize,
    live_cells: usize,
    stored_bytes: usize,
}

impl TopGroupsAccumulator {
    /// Stores a batch of output-typed cells; returns its index and rows.
    fn store(&mut self, cells: ArrayRef) -> Result<(u32, Int64Array)> {
        let structs = cells.as_struct();
        let keys = self
            .converter
            .convert_columns(&structs.columns()[..self.key_fields])?;
        let rows = structs.column(self.rows_field).as_primitive::<Int64Type>();
        let rows = Int64Array::from_iter_values(rows.iter().map(|r| r.unwrap_or(0)));
        self.stored_cells += cells.len();
        self.stored_bytes += cells.get_array_memory_size() + keys.size();
        let index = u32::try_from(self.stored.len())
            .or_else(|_| exec_err!("top_groups: too many stored batches"))?;
        self.stored.push(Stored { cells, keys });
        Ok((index, rows))
    }

    fn grow(&mut self, total_num_groups: usize) {
        if self.tops.len() < total_num_groups {
            self.tops.resize_with(total_num_groups, Vec::new);
            self.dropped.resize(total_num_groups, 0);
        }
    }

    fn compare(&self, a: &Entry, b: &Entry) -> Ordering {
        rank(&self.stored, a, b)
    }

    /// Offers one cell to unit `group`'s top `k`: kept unordered until it
    /// holds `k` cells (most units never do, and pay no comparison), then a
    /// heap with the worst kept cell on top: O(log k) per cell, so a unit
    /// with many groups costs no more than a sort would.
    fn offer(&mut self, group: usize, entry: Entry) {
        let top = &mut self.tops[group];
        if top.len() < self.k {
            top.push(entry);
            if top.len() == self.k {
                heapify(&self.stored, top);
            }
            self.live_cells += 1;
            return;
        }
        let out = if rank(&self.stored, &entry, &top[0]) == Ordering::Less {
            let out = std::mem::replace(&mut top[0], entry);
            sift_down(&self.stored, top, 0);
            out
        } else {
            entry
        };
        self.dropped[group] = self.dropped[group].saturating_add(out.rows.max(0));
    }

    /// The kept cells of the emitted units, as lists, best first.
    fn emit(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let tops = emit_to.take_needed(&mut self.tops);
        let dropped = emit_to.take_needed(&mut self.dropped);
        let mut indices = Vec::with_capacity(tops.iter().map(Vec::len).sum());
        let mut offsets = Vec::with_capacity(tops.len() + 1);
        let mut dropped_column = Vec::with_capacity(indices.capacity());
        offsets.push(0i32);
        for (mut top, dropped) in tops.into_iter().zip(dropped) {
            top.sort_by(|a, b| self.compare(a, b));
            for (i, entry) in top.iter().enumerate() {
                indices.push((entry.batch as usize, entry.row as usize));
                dropped_column.push(if i == 0 { dropped } else { 0 });
            }
            self.live_cells -= top.len();
            let end = i32::try_from(indices.len())
                .or_else(|_| exec_err!("top_groups: more cells than a list holds"))?;
            offsets.push(end);
        }
        let arrays: Vec<&dyn Array> = self.stored.iter().map(|s| s.cells.as_ref()).collect();
        let cells = if arrays.is_empty() {
            datafusion_common::arrow::array::new_empty_array(&DataType::Struct(self.fields.clone()))
        } else {
            interleave(&arrays, &indices)?
        };
        let cells = with_dropped(cells.as_struct(), Int64Array::from(dropped_column))?;
        let list = ListArray::try_new(
            Arc::new(Field::new_list_field(
                DataType::Struct(self.fields.clone()),
                false,
            )),
            OffsetBuffer::new(offsets.into()),
            Arc::new(cells),
            None,
        )?;
        if matches!(emit_to, EmitTo::All) {
            self.clear_storage();
        } else {
            self.compact_if_sparse()?;
        }
        Ok(Arc::new(list))
    }

    fn clear_storage(&mut self) {
        self.stored.clear();
        self.stored_cells = 0;
        self.stored_bytes = 0;
    }

    /// Rewrites the stored cells into one batch of the live ones when most
    /// stored cells are no longer kept, so memory follows the kept cells.
    fn compact_if_sparse(&mut self) -> Result<()> {
        // A small slack: after a spill DataFusion merges the sorted runs and
        // emits a few units at a time (`EmitTo::First`), and each unit's
        // dead cells must not stay accounted until 65,536 of them pile up
        // (that alone outgrew a query's fair share of memory and failed it).
        if self.stored_cells <= 2 * self.live_cells + 4_096 {
            return Ok(());
        }
        let mut indices = Vec::with_capacity(self.live_cells);
        for top in &self.tops {
            for entry in top {
                indices.push((entry.batch as usize, entry.row as usize));
            }
        }
        let arrays: Vec<&dyn Array> = self.stored.iter().map(|s| s.cells.as_ref()).collect();
        let cells = interleave(&arrays, &indices)?;
        self.clear_storage();
        let (batch, _) = self.store(cells)?;
        let mut next = 0u32;
        for top in &mut self.tops {
            for entry in top.iter_mut() {
                entry.batch = batch;
                entry.row = next;
                next += 1;
            }
        }
        Ok(())
    }

    /// Cells of the input type with a zero [`DROPPED`] field.
    fn as_output_cells(&self, input: &ArrayRef) -> Result<ArrayRef> {
        let structs = input.as_struct();
        let zeros = Int64Array::from(vec![0i64; structs.len()]);
        Ok(Arc::new(with_dropped(structs, zeros)?))
    }

    fn offer_cells(
        &mut self,
        cells: ArrayRef,
        group_of: impl Fn(usize) -> Option<usize>,
    ) -> Result<()> {
        let (batch, rows) = self.store(owned(cells)?)?;
        for (row, rows) in rows.values().iter().enumerate() {
            if let Some(group) = group_of(row) {
                let row =
                    u32::try_from(row).or_else(|_| exec_err!("top_groups: batch too large"))?;
                self.offer(
                    group,
                    Entry {
                        rows: *rows,
                        batch,
                        row,
                    },
                );
            }
        }
        self.compact_if_sparse()
    }
}

/// `cells` copied into buffers of its own.
///
/// An aggregation below emits its groups as slices of one large batch, and
/// partial states arrive as slices of one list's values. Kept as they are,
/// every slice would hold (and be accounted for) the whole batch's buffers:
/// the accumulator's size grew with the square of its input, and the
/// per-unit aggregation spilled at 1M rows. Arrow cannot tell how much of a
/// list column a slice uses, so every stored batch is copied: about 30 ms
/// of CPU for the 455,000 cells of a DP GROUP BY over 1M rows, where the
/// uncopied slices made it spill 8 times.
fn owned(cells: ArrayRef) -> Result<ArrayRef> {
    let every: Vec<(usize, usize)> = (0..cells.len()).map(|row| (0, row)).collect();
    Ok(interleave(&[cells.as_ref()], &every)?)
}

/// The order of cells within a unit: more rows first, then smaller keys
/// (NULL last). `Less` ranks first.
fn rank(stored: &[Stored], a: &Entry, b: &Entry) -> Ordering {
    b.rows.cmp(&a.rows).then_with(|| {
        let ka = stored[a.batch as usize].keys.row(a.row as usize);
        let kb = stored[b.batch as usize].keys.row(b.row as usize);
        ka.cmp(&kb)
    })
}

/// Makes `cells` a heap with the worst-ranked cell at the root.
fn heapify(stored: &[Stored], cells: &mut [Entry]) {
    for i in (0..cells.len() / 2).rev() {
        sift_down(stored, cells, i);
    }
}

/// Restores the heap after the root at `i` was replaced.
fn sift_down(stored: &[Stored], heap: &mut [Entry], mut i: usize) {
    loop {
        let mut worst = i;
        for child in [2 * i + 1, 2 * i + 2] {
            if child < heap.len() && rank(stored, &heap[child], &heap[worst]) == Ordering::Greater {
                worst = child;
            }
        }
        if worst == i {
            return;
        }
        heap.swap(i, worst);
        i = worst;
    }
}

/// `cells` (input or output type) with its [`DROPPED`] field set to `dropped`.
fn with_dropped(cells: &StructArray, dropped: Int64Array) -> Result<StructArray> {
    let (fields, mut columns, nulls) = cells.clone().into_parts();
    let mut fields: Vec<FieldRef> = fields.iter().cloned().collect();
    match fields.last() {
        Some(last) if last.name() == DROPPED => {
            *columns.last_mut().expect("a column per field") = Arc::new(dropped);
        }
        _ => {
            fields.push(Arc::new(Field::new(DROPPED, DataType::Int64, false)));
            columns.push(Arc::new(dropped));
        }
    }
    Ok(StructArray::try_new(Fields::from(fields), columns, nulls)?)
}

fn passes(filter: Option<&BooleanArray>, row: usize) -> bool {
    filter.is_none_or(|f| f.is_valid(row) && f.value(row))
}

impl GroupsAccumulator for TopGroupsAccumulator {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let cells = self.as_output_cells(&values[0])?;
        self.offer_cells(cells, |row| {
            passes(opt_filter, row).then_some(group_indices[row])
        })
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.emit(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.emit(emit_to)?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let lists = values[0].as_list::<i32>();
        let offsets = lists.value_offsets();
        let first = offsets[0] as usize;
        let last = offsets[offsets.len() - 1] as usize;
        let cells = lists.values().slice(first, last - first);
        // Each element's owner, and the dropped rows partial states carry.
        let mut owner = vec![None; last - first];
        for (list, group) in group_indices.iter().enumerate() {
            let (start, end) = (offsets[list] as usize, offsets[list + 1] as usize);
            for slot in &mut owner[start - first..end - first] {
                *slot = Some(*group);
            }
        }
        let carried = cells
            .as_struct()
            .column_by_name(DROPPED)
            .map(|c| c.as_primitive::<Int64Type>().clone());
        if let Some(carried) = carried {
            for (row, group) in owner.iter().enumerate() {
                if let Some(group) = group {
                    let rows = carried.value(row).max(0);
                    self.dropped[*group] = self.dropped[*group].saturating_add(rows);
                }
            }
        }
        self.offer_cells(cells, |row| owner[row])
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let cells = self.as_output_cells(&values[0])?;
        let mut offsets = Vec::with_capacity(cells.len() + 1);
        let mut indices = Vec::with_capacity(cells.len());
        offsets.push(0i32);
        for row in 0..cells.len() {
            if passes(opt_filter, row) {
                indices.push((0usize, row));
            }
            let end = i32::try_from(indices.len())
                .or_else(|_| exec_err!("top_groups: more cells than a list holds"))?;
            offsets.push(end);
        }
        let kept = interleave(&[cells.as_ref()], &indices)?;
        let list = ListArray::try_new(
            Arc::new(Field::new_list_field(
                DataType::Struct(self.fields.clone()),
                false,
            )),
            OffsetBuffer::new(offsets.into()),
            kept,
            None,
        )?;
        Ok(vec![Arc::new(list)])
    }

    fn size(&self) -> usize {
        self.stored_bytes
            + self.tops.capacity() * std::mem::size_of::<Vec<Entry>>()
            + self.live_cells * std::mem::size_of::<Entry>()
            + self.dropped.capacity() * 8
            + self.converter.size()
    }
}

/// The same aggregate for one unit at a time, where DataFusion asks for a
/// plain [`Accumulator`] (no GROUP BY, or a window).
struct OneUnit(TopGroupsAccumulator);

impl std::fmt::Debug for OneUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopGroups")
    }
}

impl Accumulator for OneUnit {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let zeros = vec![0; values[0].len()];
        self.0.update_batch(values, &zeros, None, 1)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.0.grow(1);
        let list = self.0.emit(EmitTo::All)?;
        ScalarValue::try_from_array(&list, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.0.size()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let zeros = vec![0; states[0].len()];
        self.0.merge_batch(states, &zeros, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion_common::arrow::array::StringArray;

    /// Cells (key, rows) of units 0..3, in the order given.
    fn cells(rows: &[(&str, i64)]) -> ArrayRef {
        let keys = StringArray::from_iter_values(rows.iter().map(|r| r.0));
        let counts = Int64Array::from_iter_values(rows.iter().map(|r| r.1));
        Arc::new(StructArray::from(vec![
            (
                Arc::new(Field::new("k", DataType::Utf8, true)),
                Arc::new(keys) as ArrayRef,
            ),
            (
                Arc::new(Field::new("rows", DataType::Int64, false)),
                Arc::new(counts) as ArrayRef,
            ),
        ]))
    }

    /// (unit, key, rows) → per unit: kept (key, rows, dropped) best first.
    fn run(
        input: &[(usize, &str, i64)],
        split: usize,
        via_state: bool,
    ) -> Vec<Vec<(String, i64, i64)>> {
        let top = TopGroups::new(2, 1, 1);
        let data_type = cells(&[]).data_type().clone();
        let mut final_acc = top.accumulator_for(&data_type).unwrap();
        for part in [&input[..split], &input[split..]] {
            let array = cells(&part.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>());
            let groups: Vec<usize> = part.iter().map(|r| r.0).collect();
            let state = if via_state {
                top.accumulator_for(&data_type)
                    .unwrap()
                    .convert_to_state(&[array], None)
                    .unwrap()
            } else {
                let mut partial = top.accumulator_for(&data_type).unwrap();
                partial.update_batch(&[array], &groups, None, 3).unwrap();
                let state = partial.state(EmitTo::All).unwrap();
                // Partial states are per unit 0..3: group indices follow.
                final_acc
                    .merge_batch(&state, &[0, 1, 2][..state[0].len()], 3)
                    .unwrap();
                continue;
            };
            final_acc.merge_batch(&state, &groups, 3).unwrap();
        }
        let out = final_acc.evaluate(EmitTo::All).unwrap();
        let lists = out.as_list::<i32>();
        (0..lists.len())
            .map(|u| {
                let cells = lists.value(u);
                let cells = cells.as_struct();
                let keys = cells.column(0).as_string::<i32>();
                let rows = cells.column(1).as_primitive::<Int64Type>();
                let dropped = cells.column(2).as_primitive::<Int64Type>();
                (0..cells.len())
                    .map(|i| (keys.value(i).to_string(), rows.value(i), dropped.value(i)))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_slice_of_a_large_batch_is_accounted_for_its_own_cells() {
        let top = TopGroups::new(2, 1, 1);
        let names: Vec<String> = (0..100_000).map(|i| format!("key-{i}")).collect();
        let plain = cells(&names.iter().map(|k| (k.as_str(), 1)).collect::<Vec<_>>());
        // With a list field, as the cells of a quantile query carry.
        let values = ListArray::from_iter_primitive::<Int64Type, _, _>(
            (0..100_000).map(|i| Some(vec![Some(i), Some(i + 1)])),
        );
        let (fields, mut columns, _) = plain.as_struct().clone().into_parts();
        let mut fields: Vec<FieldRef> = fields.iter().cloned().collect();
        fields.push(Arc::new(Field::new(
            "vals",
            values.data_type().clone(),
            true,
        )));
        columns.push(Arc::new(values));
        let big: ArrayRef =
            Arc::new(StructArray::try_new(Fields::from(fields), columns, None).unwrap());
        let mut acc = top.accumulator_for(big.data_type()).unwrap();
        for start in [0, 50_000] {
            let slice = big.slice(start, 100);
            let groups: Vec<usize> = (0..100).collect();
            acc.update_batch(&[slice], &groups, None, 100).unwrap();
        }
        // The whole batch is over 3 MB; two slices of 100 cells are not.
        assert!(big.get_array_memory_size() > 3_000_000);
        assert!(acc.size() < 100_000, "accounted {} bytes", acc.size());
        let out = acc.evaluate(EmitTo::All).unwrap();
        let first = out.as_list::<i32>().value(0);
        let keys = first.as_struct().column(0).as_string::<i32>().clone();
        assert_eq!(keys.value(0), "key-0");
        assert_eq!(keys.value(1), "key-50000");
    }

    const INPUT: &[(usize, &str, i64)] = &[
        (0, "a", 3),
        (0, "b", 5),
        (1, "x", 1),
        (0, "c", 3),
        (2, "m", 2),
        (0, "d", 1),
        (2, "n", 2),
        (1, "y", 4),
        (2, "o", 2),
    ];

    #[test]
    fn keeps_the_largest_groups_with_ties_by_key_and_counts_the_rest() {
        let expected = vec![
            vec![("b".to_string(), 5, 4), ("a".to_string(), 3, 0)],
            vec![("y".to_string(), 4, 0), ("x".to_string(), 1, 0)],
            vec![("m".to_string(), 2, 2), ("n".to_string(), 2, 0)],
        ];
        let mut reversed = INPUT.to_vec();
        reversed.reverse();
        for split in 0..=INPUT.len() {
            for via_state in [false, true] {
                assert_eq!(run(INPUT, split, via_state), expected, "split {split}");
                assert_eq!(
                    run(&reversed, split, via_state),
                    expected,
                    "reversed, split {split}"
                );
            }
        }
    }

    /// Many batches (so the storage is compacted several times), rows that
    /// tie, and units emitted in two parts: the result equals the top `k`
    /// computed directly.
    #[test]
    fn compaction_and_partial_emits_keep_the_same_cells() {
        let top = TopGroups::new(3, 1, 1);
        let data_type = cells(&[]).data_type().clone();
        let mut acc = top.accumulator_for(&data_type).unwrap();
        let mut state = 7u64;
        let mut all: Vec<(usize, String, i64)> = Vec::new();
        for batch in 0..200 {
            let mut rows = Vec::new();
            for i in 0..1000 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (state >> 33) as usize % 5;
                let count = (state >> 20) as i64 % 4;
                rows.push((unit, format!("g{batch:03}-{i:04}"), count));
            }
            let array = cells(&rows.iter().map(|r| (r.1.as_str(), r.2)).collect::<Vec<_>>());
            let groups: Vec<usize> = rows.iter().map(|r| r.0).collect();
            acc.update_batch(&[array], &groups, None, 5).unwrap();
            all.extend(rows);
        }
        assert!(
            acc.stored.len() < 10,
            "compacted: {} batches",
            acc.stored.len()
        );
        let first = acc.evaluate(EmitTo::First(2)).unwrap();
        let rest = acc.evaluate(EmitTo::All).unwrap();
        let lists = [first, rest];
        let mut got = Vec::new();
        for list in &lists {
            let list = list.as_list::<i32>();
            for u in 0..list.len() {
                let cells = list.value(u);
                let cells = cells.as_struct();
                let keys = cells.column(0).as_string::<i32>();
                let dropped = cells.column(2).as_primitive::<Int64Type>();
                let kept: Vec<String> = (0..cells.len())
                    .map(|i| keys.value(i).to_string())
                    .collect();
                got.push((kept, dropped.value(0)));
            }
        }
        for (unit, (kept, dropped)) in got.iter().enumerate() {
            let mut mine: Vec<&(usize, String, i64)> = all.iter().filter(|r| r.0 == unit).collect();
            mine.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.1.cmp(&b.1)));
            let want: Vec<String> = mine.iter().take(3).map(|r| r.1.clone()).collect();
            let want_dropped: i64 = mine.iter().skip(3).map(|r| r.2).sum();
            assert_eq!(kept, &want, "unit {unit}");
            assert_eq!(*dropped, want_dropped, "unit {unit}");
        }
    }
}

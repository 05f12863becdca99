//! Where a step or one of its executions sits in a run: the include steps
//! above it, its own id, and its item in a fan-out. Written
//! `include.step[3]` in events, records and the journal.

use std::fmt;
use std::str::FromStr;

/// The path of a step in a run (`charge`, `billing.charge`), or of one
/// execution of it (`charge[3]`, an item of a fan-out).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepPath {
    /// The step ids from the run's own workflow down to this step: more than
    /// one inside included workflows.
    ids: Vec<String>,
    /// The item of a fan-out, for an execution.
    item: Option<usize>,
}

impl StepPath {
    /// A step of the run's own workflow.
    pub fn root(id: &str) -> Self {
        StepPath { ids: vec![id.to_owned()], item: None }
    }

    /// Step `id` of the workflow this include step runs.
    pub fn child(&self, id: &str) -> Self {
        let mut ids = self.ids.clone();
        ids.push(id.to_owned());
        StepPath { ids, item: None }
    }

    /// Item `index` of this step's fan-out.
    pub fn item(&self, index: usize) -> Self {
        StepPath { ids: self.ids.clone(), item: Some(index) }
    }

    /// The step itself, without the item.
    pub fn step(&self) -> Self {
        StepPath { ids: self.ids.clone(), item: None }
    }

    /// The step's own id, in its workflow.
    pub fn id(&self) -> &str {
        self.ids.last().map_or("", String::as_str)
    }

    /// The item of a fan-out, if this is one.
    pub fn index(&self) -> Option<usize> {
        self.item
    }

    /// How many workflows deep the step is: 1 in the run's own workflow.
    pub fn depth(&self) -> usize {
        self.ids.len()
    }

    /// The include step this one runs under, if any.
    pub fn parent(&self) -> Option<Self> {
        (self.ids.len() > 1).then(|| StepPath { ids: self.ids[..self.ids.len() - 1].to_vec(), item: None })
    }

    /// Whether this is `other`, an item of it, or anything inside it (when
    /// `other` is an include step): what `retry --from other` runs again.
    pub fn is_within(&self, other: &StepPath) -> bool {
        self.ids.starts_with(&other.ids)
            && (self.ids.len() > other.ids.len() || other.item.is_none() || self.item == other.item)
    }
}

impl fmt::Display for StepPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written id by id: a path is made text for every attempt.
        for (i, id) in self.ids.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(id)?;
        }
        match self.item {
            Some(index) => write!(f, "[{index}]"),
            None => Ok(()),
        }
    }
}

impl FromStr for StepPath {
    type Err = String;

    /// Reads `a.b[3]`; step ids hold letters, digits, `_` and `-` only, so
    /// `.` and `[` cannot be part of one.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || format!("`{text}` is not a step path (like `charge`, `billing.charge` or `charge[3]`)");
        let (ids, item) = match text.strip_suffix(']').and_then(|rest| rest.rsplit_once('[')) {
            Some((ids, index)) => (ids, Some(index.parse().map_err(|_| invalid())?)),
            None => (text, None),
        };
        let ids: Vec<String> = ids.split('.').map(str::to_owned).collect();
        let valid =
            |id: &String| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ids.iter().all(valid) {
            return Err(invalid());
        }
        Ok(StepPath { ids, item })
    }
}

/// A path is its text in the API's documents.
impl utoipa::PartialSchema for StepPath {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        String::schema()
    }
}

impl utoipa::ToSchema for StepPath {}

impl serde::Serialize for StepPath {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StepPath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_and_parse_back() {
        let item = StepPath::root("billing").child("charge").item(3);
        assert_eq!(item.to_string(), "billing.charge[3]");
        assert_eq!("billing.charge[3]".parse::<StepPath>().unwrap(), item);
        assert_eq!(item.step().to_string(), "billing.charge");
        assert_eq!(item.id(), "charge");
        assert_eq!(item.parent(), Some(StepPath::root("billing")));
        for bad in ["", "a..b", "a[", "a[x]", "a b", "a[1]b", "[1]"] {
            assert!(bad.parse::<StepPath>().is_err(), "{bad}");
        }
    }

    #[test]
    fn within_covers_items_and_included_steps_but_not_lookalikes() {
        let charge = StepPath::root("charge");
        assert!(charge.item(2).is_within(&charge));
        assert!(charge.child("inner").item(0).is_within(&charge));
        assert!(charge.is_within(&charge));
        assert!(!StepPath::root("charge-2").is_within(&charge));
        assert!(!StepPath::root("charge").is_within(&charge.item(1)));
        assert!(!charge.item(2).is_within(&charge.item(1)));
    }
}

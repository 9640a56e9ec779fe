//! Reading the current generation back from Redis (the serving layer and
//! the tests): `recs:meta` names the generation, and every other value is
//! the field of that generation's parity in its hash
//! ([`super::publish::generation_field`]).

use std::collections::HashMap;

use anyhow::Context;
use serde::Deserialize;

use super::publish::{generation_field, Meta};
use super::{Scored, Source};
use crate::sinks::redis::{item_neighbours_key, recs_key, recs_meta_key, recs_popular_key};

/// A user's record as Redis holds it: their `recommendations` record
/// (schemas/recommendation.json) without the offsets, which `recs:meta` holds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UserList {
    pub user_id: String,
    pub items: Vec<Scored>,
    pub source: Source,
    pub generation: u64,
    pub built_at: i64,
}

#[derive(Deserialize)]
struct PopularList {
    items: Vec<Scored>,
    generation: u64,
}

/// What the current generation holds for one request.
#[derive(Debug, Clone, Default)]
pub struct Current {
    pub meta: Option<Meta>,
    /// The user's own list (None: unknown user, or no generation).
    pub user: Option<UserList>,
    pub popular: Vec<Scored>,
    /// Neighbour lists of the asked items that have one.
    pub neighbours: HashMap<String, Vec<Scored>>,
}

/// The generation `recs:meta` names (None: nothing published yet).
pub async fn read_meta<C: redis::aio::ConnectionLike>(
    con: &mut C,
    prefix: &str,
) -> anyhow::Result<Option<Meta>> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(recs_meta_key(prefix))
        .query_async(con)
        .await
        .context("reading recs:meta")?;
    Ok(raw.and_then(|r| serde_json::from_str::<Meta>(&r).ok()))
}

/// In one round trip: the user's list, the popular list and the
/// neighbours of `items` of generation `meta` (a reader may cache `meta`
/// for a moment: a rebuild keeps the previous generation's fields until
/// the one after).
pub async fn read_generation<C: redis::aio::ConnectionLike>(
    con: &mut C,
    prefix: &str,
    meta: Meta,
    user_id: &str,
    items: &[&str],
) -> anyhow::Result<Current> {
    let g = meta.generation;
    let field = generation_field(g);
    let mut pipe = redis::pipe();
    pipe.cmd("HGET").arg(recs_key(prefix, user_id)).arg(field);
    pipe.cmd("HGET").arg(recs_popular_key(prefix)).arg(field);
    for i in items {
        pipe.cmd("HGET")
            .arg(item_neighbours_key(prefix, i))
            .arg(field);
    }
    let vals: Vec<Option<String>> = pipe
        .query_async(con)
        .await
        .context("reading the current generation")?;
    let mut vals = vals.into_iter();
    let user = vals
        .next()
        .flatten()
        .and_then(|v| serde_json::from_str::<UserList>(&v).ok())
        // The field of another generation (a rebuild after the one `meta`
        // names, writing or dead, overwrites the one before it).
        .filter(|u| u.generation == g);
    let popular = vals
        .next()
        .flatten()
        .and_then(|v| serde_json::from_str::<PopularList>(&v).ok())
        .filter(|p| p.generation == g)
        .map(|p| p.items)
        .unwrap_or_default();
    let mut neighbours = HashMap::new();
    for (i, v) in items.iter().zip(vals) {
        if let Some(list) = v.and_then(|v| serde_json::from_str::<Vec<Scored>>(&v).ok()) {
            neighbours.insert(i.to_string(), list);
        }
    }
    Ok(Current {
        meta: Some(meta),
        user,
        popular,
        neighbours,
    })
}

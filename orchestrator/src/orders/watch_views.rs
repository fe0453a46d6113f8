//! One reload per change of an order, however many streams watch it.
//!
//! Every `WatchOrder` stream of one order shares a view: one task holds the
//! saga's change watch, loads the order once per change and hands the
//! snapshot to all of the order's streams. Before, each stream reloaded the
//! order on every change itself, so N watchers of a popular order made N
//! reads of the store per change.
//!
//! No change is missed: the view's task makes its change watch before its
//! first load, and a stream that joins a running view starts from the latest
//! snapshot, which is followed by the reload of any change after it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use ordersaga_proto::orders::v1::Order;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use saga_engine::{Engine, SagaStatus, SagaWatch};
use tokio::sync::watch;
use tonic::Status;
use uuid::Uuid;

use crate::{order_saga::OrderData, orders::store};

/// An order as loaded, with its saga's status.
pub type Snapshot = Arc<(Order, SagaStatus)>;

/// What a view holds: nothing before its first load, then the latest load
/// (or why it failed; a view ends after a failure or a terminal status).
pub type ViewState = Option<Result<Snapshot, Status>>;

type Views = Arc<Mutex<HashMap<Uuid, watch::Sender<ViewState>>>>;

#[derive(Clone)]
pub struct WatchViews {
    engine: Engine<OrderData>,
    views: Views,
    loads: Counter,
}

impl WatchViews {
    pub fn new(engine: Engine<OrderData>, registry: &mut Registry) -> Self {
        let loads = Counter::default();
        registry.register(
            "order_watch_loads",
            "Loads of an order from the store for WatchOrder streams (one per change, shared by its streams)",
            loads.clone(),
        );
        WatchViews {
            engine,
            views: Arc::default(),
            loads,
        }
    }

    /// The order's view, started if none runs.
    pub fn subscribe(&self, order_id: Uuid) -> watch::Receiver<ViewState> {
        let mut views = self.views.lock().unwrap();
        if let Some(sender) = views.get(&order_id) {
            return sender.subscribe();
        }
        let (sender, receiver) = watch::channel(None);
        views.insert(order_id, sender.clone());
        let changes = self.engine.watch(order_id);
        tokio::spawn(self.clone().run(order_id, sender, changes));
        receiver
    }

    async fn run(self, order_id: Uuid, sender: watch::Sender<ViewState>, mut changes: SagaWatch) {
        loop {
            self.loads.inc();
            let loaded = store::load_one(&self.engine, order_id)
                .await
                .map(Arc::new)
                .map_err(Status::from);
            let ends = loaded
                .as_ref()
                .map_or(true, |snapshot| snapshot.1.is_terminal());
            sender.send_replace(Some(loaded));
            if ends {
                break;
            }
            tokio::select! {
                _ = changes.changed() => {}
                () = sender.closed() => {
                    // Decided under the lock that `subscribe` takes, so no
                    // stream joins a view that is going away.
                    let mut views = self.views.lock().unwrap();
                    if sender.receiver_count() == 0 {
                        remove(&mut views, order_id, &sender);
                        return;
                    }
                }
            }
        }
        // Streams that join before this see the final snapshot.
        remove(&mut self.views.lock().unwrap(), order_id, &sender);
    }
}

fn remove(
    views: &mut HashMap<Uuid, watch::Sender<ViewState>>,
    order_id: Uuid,
    sender: &watch::Sender<ViewState>,
) {
    if views
        .get(&order_id)
        .is_some_and(|current| current.same_channel(sender))
    {
        views.remove(&order_id);
    }
}

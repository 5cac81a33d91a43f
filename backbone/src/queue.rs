//! A bounded many-producer, one-consumer queue for one subscription's deliveries, whose memory
//! is what it holds: nothing is allocated until the first item, and what a burst grew is freed
//! once the consumer has taken it ([decision 0092](../../docs/decisions/0092-subscription-queues-hold-only-what-they-hold.md)).
//!
//! tokio's bounded `mpsc` (which this replaces) allocates its first block of 32 slots and a
//! cache-padded channel when it is made: about 2 KiB for every subscription, idle or not
//! (issue 23: 2.2 KiB of the 5.9 KiB an idle WebSocket connection with one subscription cost),
//! and it keeps the blocks a burst grew. flume's bounded channel (in the tree) starts empty
//! but never shrinks its queue and allocates a hook for every wait of an async receiver.
//!
//! The design is a mutex around a `VecDeque`, with two things to keep the consumer off the
//! lock: it swaps the whole shared deque for its own empty one and takes items from that
//! without locking, and the number held (`len`, the bound) is an atomic both sides count.
//! Producers wake the consumer through an `AtomicWaker`; producers that wait for room
//! ([`Sender::send`]) wait on a `Notify` the consumer signals when `len` drops below the bound.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

/// Why [`Sender::try_send`] gave the item back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds `capacity` items.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// A deque larger than this (in items) is freed once drained; smaller ones are kept for the
/// next items (a subscription that gets an event now and then does not allocate each time).
const KEEP_CAPACITY: usize = 8;

struct Shared<T> {
    items: Mutex<Items<T>>,
    /// Items in the queue, including those the receiver swapped out and has not yet taken.
    len: AtomicUsize,
    capacity: usize,
    senders: AtomicUsize,
    receiver: AtomicWaker,
    /// Signalled when `len` drops below `capacity`, or the receiver goes.
    room: Notify,
}

struct Items<T> {
    deque: VecDeque<T>,
    receiver_gone: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Items<T>> {
        // Nothing panics while the lock is held except allocation failure; a poisoned lock
        // holds a consistent deque.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A queue of at most `capacity` items (at least 1).
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        items: Mutex::new(Items {
            deque: VecDeque::new(),
            receiver_gone: false,
        }),
        len: AtomicUsize::new(0),
        capacity: capacity.max(1),
        senders: AtomicUsize::new(1),
        receiver: AtomicWaker::new(),
        room: Notify::new(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver {
            shared,
            taken: VecDeque::new(),
        },
    )
}

/// The producing side; clones share the queue. The receiver sees the end once every sender
/// is dropped and the queue is empty.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.receiver.wake();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("len", &self.len())
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

impl<T> Sender<T> {
    /// Queues `item` unless the queue is full or the receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let shared = &*self.shared;
        {
            let mut items = shared.lock();
            if items.receiver_gone {
                return Err(TrySendError::Closed(item));
            }
            // Read under the lock, so two senders cannot both take the last place; the
            // receiver lowers it without the lock, which can only make room.
            if shared.len.load(Ordering::Acquire) >= shared.capacity {
                return Err(TrySendError::Full(item));
            }
            items.deque.push_back(item);
            shared.len.fetch_add(1, Ordering::AcqRel);
        }
        shared.receiver.wake();
        Ok(())
    }

    /// Queues `item`, waiting for room while the queue is full; gives it back if the receiver
    /// is gone. Cancel-safe: dropped while waiting, nothing was queued.
    pub async fn send(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            // Registered before trying, so room made between the try and the wait is seen.
            room.as_mut().enable();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => {
                    item = back;
                    room.await;
                }
            }
        }
    }

    /// Items queued (a snapshot).
    pub fn len(&self) -> usize {
        self.shared.len.load(Ordering::Acquire)
    }

    /// Whether the queue holds `capacity` items (a snapshot).
    pub fn is_full(&self) -> bool {
        self.len() >= self.shared.capacity
    }

    /// Whether nothing is queued (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given at [`bounded`].
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

/// The consuming side.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
    /// Items swapped out of the shared deque, taken from here without the lock.
    taken: VecDeque<T>,
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("len", &self.shared.len.load(Ordering::Relaxed))
            .field("capacity", &self.shared.capacity)
            .finish()
    }
}

impl<T> Receiver<T> {
    /// The next item; `Ready(None)` once every sender is gone and the queue is empty.
    ///
    /// Each item taken spends the task's tokio budget, as tokio's own channels do
    /// (`tokio::task::coop`): a consumer that always finds items (a NATS fan-out task under a
    /// flood) yields every 128 of them instead of holding its worker thread, so the tasks it
    /// feeds on that thread get to drain their queues. Without it, the cross-instance NATS
    /// row delivered a fifth of what it did on tokio's channel.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        let polled = self.poll_items(cx);
        if polled.is_ready() {
            coop.made_progress();
        }
        polled
    }

    fn poll_items(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.take_local() {
            return Poll::Ready(Some(item));
        }
        if self.refill() {
            return Poll::Ready(self.take_local());
        }
        // Registered before looking again: a sender that queues after the look wakes it.
        self.shared.receiver.register(cx.waker());
        if self.refill_or_shrink() {
            return Poll::Ready(self.take_local());
        }
        if self.shared.senders.load(Ordering::Acquire) == 0 && !self.refill() {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// [`Self::refill`], and when there is nothing to take (the receiver is about to wait), frees
    /// what a burst grew: the receiver's deque and the shared one (the receiver's former), under
    /// the lock the look took anyway. Only when it waits, not each time a batch is taken: under a
    /// steady flood the two deques are swapped back and forth at the size of the backlog, and
    /// freeing one after every batch made the producer grow it again from nothing (a NATS
    /// subscription of 65,536 messages copied megabytes per batch: 5× slower).
    fn refill_or_shrink(&mut self) -> bool {
        debug_assert!(self.taken.is_empty());
        let mut items = self.shared.lock();
        if !items.deque.is_empty() {
            std::mem::swap(&mut items.deque, &mut self.taken);
            return true;
        }
        if items.deque.capacity() > KEEP_CAPACITY {
            items.deque = VecDeque::new();
        }
        drop(items);
        if self.taken.capacity() > KEEP_CAPACITY {
            self.taken = VecDeque::new();
        }
        false
    }

    /// Takes the next swapped-out item.
    fn take_local(&mut self) -> Option<T> {
        let item = self.taken.pop_front()?;
        let before = self.shared.len.fetch_sub(1, Ordering::AcqRel);
        if before == self.shared.capacity {
            self.shared.room.notify_waiters();
        }
        Some(item)
    }

    /// Swaps the shared deque (if it holds anything) for the empty local one; true if it did.
    fn refill(&mut self) -> bool {
        debug_assert!(self.taken.is_empty());
        let mut items = self.shared.lock();
        if items.deque.is_empty() {
            return false;
        }
        std::mem::swap(&mut items.deque, &mut self.taken);
        true
    }
}

impl<T> futures_util::Stream for Receiver<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.poll_recv(cx)
    }
}

// The receiver holds no pinned state.
impl<T> Unpin for Receiver<T> {}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let dropped = {
            let mut items = self.shared.lock();
            items.receiver_gone = true;
            std::mem::take(&mut items.deque)
        };
        // Items are dropped outside the lock (a delivery's drop may do anything).
        drop(dropped);
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_and_the_end_after_the_last_sender() {
        let (tx, mut rx) = bounded(4);
        let tx2 = tx.clone();
        tx.try_send(1).unwrap();
        tx2.try_send(2).unwrap();
        drop(tx);
        tx2.try_send(3).unwrap();
        drop(tx2);
        assert_eq!(rx.next().await, Some(1));
        assert_eq!(rx.next().await, Some(2));
        assert_eq!(rx.next().await, Some(3));
        assert_eq!(rx.next().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_until_the_receiver_takes_one() {
        let (tx, mut rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        assert_eq!(tx.len(), 2);
        // Taking one (from the swapped-out deque) makes room for exactly one.
        assert_eq!(rx.next().await, Some(1));
        tx.try_send(3).unwrap();
        assert_eq!(tx.try_send(4), Err(TrySendError::Full(4)));
        assert_eq!(rx.next().await, Some(2));
        assert_eq!(rx.next().await, Some(3));
        assert!(tx.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_sender_goes_on_once_there_is_room() {
        let (tx, mut rx) = bounded(1);
        tx.try_send(1).unwrap();
        let waiting = tokio::spawn(async move {
            tx.send(2).await.unwrap();
            tx
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.next().await, Some(1));
        let tx = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rx.next().await, Some(2));
        drop(tx);
        assert_eq!(rx.next().await, None);
    }

    #[tokio::test]
    async fn senders_learn_that_the_receiver_is_gone() {
        let (tx, rx) = bounded(1);
        tx.try_send(1).unwrap();
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        let back = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, Err(2));
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
    }

    #[tokio::test]
    async fn a_receiver_waiting_is_woken_by_a_sender_on_another_thread() {
        let (tx, mut rx) = bounded(1024);
        let sender = std::thread::spawn(move || {
            for i in 0..100_000u32 {
                let mut item = i;
                loop {
                    match tx.try_send(item) {
                        Ok(()) => break,
                        Err(TrySendError::Full(back)) => {
                            item = back;
                            std::thread::yield_now();
                        }
                        Err(TrySendError::Closed(_)) => panic!("receiver gone"),
                    }
                }
            }
        });
        let mut expected = 0u32;
        while let Some(i) = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .unwrap()
        {
            assert_eq!(i, expected);
            expected += 1;
        }
        assert_eq!(expected, 100_000);
        sender.join().unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_consumer_that_always_finds_items_still_lets_other_tasks_run() {
        let (tx, mut rx) = bounded(100_000);
        for i in 0..10_000 {
            tx.try_send(i).unwrap();
        }
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = ran.clone();
        tokio::spawn(async move { other.store(true, Ordering::Relaxed) });
        let mut taken = 0;
        while !ran.load(Ordering::Relaxed) {
            rx.next().await.unwrap();
            taken += 1;
            assert!(taken < 10_000, "the consumer never yielded");
        }
        // tokio's budget is 128 per task poll: the 129th receive yields, then returns its item.
        assert!(taken <= 129, "yielded only after {taken} items");
    }

    #[tokio::test]
    async fn a_burst_is_freed_once_taken() {
        let (tx, mut rx) = bounded(10_000);
        for i in 0..5_000 {
            tx.try_send(i).unwrap();
        }
        for _ in 0..5_000 {
            rx.next().await.unwrap();
        }
        // Freed once the receiver finds the queue empty.
        let waker = futures_util::task::noop_waker();
        assert!(
            rx.poll_recv(&mut Context::from_waker(&waker)).is_pending(),
            "the queue is empty"
        );
        assert_eq!(rx.taken.capacity(), 0);
        assert!(rx.shared.lock().deque.capacity() <= KEEP_CAPACITY);
        // An idle queue allocated nothing.
        let (_tx, rx) = bounded::<u64>(100);
        assert_eq!(rx.taken.capacity(), 0);
        assert_eq!(rx.shared.lock().deque.capacity(), 0);
    }
}

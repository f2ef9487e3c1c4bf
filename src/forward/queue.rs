//! The requests waiting for the upstream, bounded in bytes.
//!
//! The budget covers every request the forwarder holds: those waiting and
//! those being sent. When a new request does not fit, the oldest waiting
//! ones make room: telemetry is worth most while it is fresh. A request
//! that cannot fit even then (larger than the budget, or the budget taken
//! by requests in flight) is dropped itself.

use std::collections::VecDeque;

use bytes::Bytes;

use super::Signal;

/// One received OTLP request, as protobuf bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub signal: Signal,
    pub body: Bytes,
}

impl Request {
    fn bytes(&self) -> usize {
        self.body.len()
    }
}

/// Requests oldest first, and the bytes held, in flight included.
#[derive(Debug)]
pub struct Queue {
    waiting: VecDeque<Request>,
    held_bytes: usize,
    max_bytes: usize,
}

impl Queue {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            held_bytes: 0,
            max_bytes,
        }
    }

    /// Queues `request`, dropping the oldest waiting requests while it does
    /// not fit. Returns what was dropped, `request` itself when it could
    /// not fit at all.
    pub fn push(&mut self, request: Request) -> Vec<Request> {
        let mut dropped = Vec::new();
        if request.bytes() > self.max_bytes {
            dropped.push(request);
            return dropped;
        }
        while self.held_bytes + request.bytes() > self.max_bytes {
            let Some(oldest) = self.waiting.pop_front() else {
                // All the room is in flight.
                dropped.push(request);
                return dropped;
            };
            self.held_bytes -= oldest.bytes();
            dropped.push(oldest);
        }
        self.held_bytes += request.bytes();
        self.waiting.push_back(request);
        dropped
    }

    /// The oldest waiting request, to send. Its bytes stay held until
    /// [`Queue::sent`].
    pub fn take(&mut self) -> Option<Request> {
        self.waiting.pop_front()
    }

    /// A request from [`Queue::take`] is done with, delivered or not.
    pub fn sent(&mut self, request: &Request) {
        self.held_bytes = self.held_bytes.saturating_sub(request.bytes());
    }

    /// Empties the queue, in flight aside, returning what was waiting.
    pub fn drain(&mut self) -> Vec<Request> {
        let drained: Vec<Request> = self.waiting.drain(..).collect();
        for request in &drained {
            self.held_bytes -= request.bytes();
        }
        drained
    }

    /// Bytes waiting or in flight; never more than the budget.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Whether nothing is waiting (requests may still be in flight).
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(signal: Signal, bytes: usize, fill: u8) -> Request {
        Request {
            signal,
            body: Bytes::from(vec![fill; bytes]),
        }
    }

    fn fills(requests: &[Request]) -> Vec<u8> {
        requests.iter().map(|request| request.body[0]).collect()
    }

    #[test]
    fn requests_come_out_oldest_first_and_are_held_until_sent() {
        let mut queue = Queue::new(100);
        assert!(queue.push(request(Signal::Metrics, 10, 1)).is_empty());
        assert!(queue.push(request(Signal::Traces, 20, 2)).is_empty());
        assert_eq!(queue.held_bytes(), 30);
        let first = queue.take().expect("queued");
        assert_eq!((first.signal, first.body[0]), (Signal::Metrics, 1));
        assert_eq!(queue.held_bytes(), 30, "in flight is still held");
        queue.sent(&first);
        assert_eq!(queue.held_bytes(), 20);
        assert_eq!(queue.take().map(|r| r.body[0]), Some(2));
        assert!(queue.take().is_none());
    }

    #[test]
    fn a_full_queue_drops_its_oldest_until_the_new_request_fits() {
        let mut queue = Queue::new(100);
        for fill in 1..=4 {
            assert!(queue.push(request(Signal::Metrics, 25, fill)).is_empty());
        }
        assert_eq!(queue.held_bytes(), 100, "exactly the budget fits");
        let dropped = queue.push(request(Signal::Logs, 40, 5));
        assert_eq!(fills(&dropped), [1, 2], "the two oldest, no more");
        assert_eq!(queue.held_bytes(), 90);
        assert_eq!(fills(&queue.drain()), [3, 4, 5]);
        assert_eq!(queue.held_bytes(), 0);
    }

    #[test]
    fn a_request_larger_than_the_budget_is_dropped_and_nothing_else() {
        let mut queue = Queue::new(100);
        queue.push(request(Signal::Metrics, 60, 1));
        let dropped = queue.push(request(Signal::Traces, 101, 2));
        assert_eq!(fills(&dropped), [2]);
        assert_eq!(queue.held_bytes(), 60);
        assert!(!queue.is_empty());
    }

    #[test]
    fn requests_in_flight_are_never_evicted_and_count_against_the_budget() {
        let mut queue = Queue::new(100);
        queue.push(request(Signal::Metrics, 70, 1));
        queue.push(request(Signal::Metrics, 20, 2));
        let in_flight = queue.take().expect("queued");
        // 70 in flight, 20 waiting: a 40-byte request evicts the waiting
        // one and still does not fit, so it goes too.
        let dropped = queue.push(request(Signal::Traces, 40, 3));
        assert_eq!(fills(&dropped), [2, 3]);
        assert_eq!(queue.held_bytes(), 70);
        queue.sent(&in_flight);
        assert!(queue.push(request(Signal::Traces, 40, 4)).is_empty());
        assert_eq!(queue.held_bytes(), 40);
    }

    #[test]
    fn the_budget_holds_whatever_the_sizes() {
        let mut queue = Queue::new(1000);
        let mut in_flight = Vec::new();
        for step in 0..2000_usize {
            let bytes = (step * 7919) % 400 + 1;
            queue.push(request(Signal::Metrics, bytes, (step % 251) as u8));
            if step % 3 == 0 {
                in_flight.extend(queue.take());
            }
            if step % 5 == 0 {
                if let Some(done) = in_flight.pop() {
                    queue.sent(&done);
                }
            }
            assert!(queue.held_bytes() <= 1000, "step {step}");
        }
    }
}

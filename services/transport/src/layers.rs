//! The servers' middleware, one concern per tower layer, outermost first:
//! - [`TraceLayer`]: one span per RPC, child of the caller's `traceparent`;
//! - [`MetricsLayer`]: requests by code, latency, in flight, each taken when the RPC ends: a
//!   streaming RPC's code is the one its trailers carry (an error mid-stream, a deadline), its
//!   duration runs to that end; an RPC whose caller goes away before its end is CANCELLED;
//! - [`ShedLayer`]: the concurrency limit, RESOURCE_EXHAUSTED at once past it (health checks and
//!   reflection are never shed);
//! - [`DeadlineLayer`]: DEADLINE_EXCEEDED once the caller's `grpc-timeout` passes, before the
//!   answer or in the middle of a stream (which then ends with it in its trailers).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::IntCounterVec;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_layer::Layer;
use tower_service::Service;

use crate::metrics::RpcMetrics;

type Body = tonic::body::Body;
type Request = http::Request<Body>;
type Response = http::Response<Body>;
type BoxFuture<E> = Pin<Box<dyn Future<Output = Result<Response, E>> + Send>>;

/// The bound every wrapped service meets (tonic's routes).
pub trait Inner:
    Service<Request, Response = Response, Future: Send + 'static, Error: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> Inner for S where
    S: Service<Request, Response = Response, Future: Send + 'static, Error: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// The ready service for this call, leaving a clone for the next (tower's rule).
fn take<S: Clone>(s: &mut S) -> S {
    let clone = s.clone();
    std::mem::replace(s, clone)
}

/// (service, method) of a gRPC path `/package.Service/Method`.
fn rpc_name(request: &Request, fallback: &str) -> (String, String) {
    let (service, method) = request
        .uri()
        .path()
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((fallback, ""));
    (service.to_string(), method.to_string())
}

/// What a response body's `poll_frame` answers.
type Polled = Poll<Option<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>>;

/// A response body that keeps `T` alive until the body is dropped: a streaming RPC holds its
/// permit and its in-flight count until its stream ends, not just until its headers go out.
struct Holding<T> {
    inner: Body,
    _held: T,
}

impl<T: Unpin> http_body::Body for Holding<T> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn hold<T: Send + Unpin + 'static>(response: Response, held: T) -> Response {
    response.map(|inner| Body::new(Holding { inner, _held: held }))
}

/// A layer and its service: the layer's struct, the `Layer` that clones the layer's fields into
/// the service, and the `Service` whose readiness is the inner service's; only `call` (given
/// verbatim) differs.
macro_rules! layer {
    (
        $(#[$doc:meta])*
        $layer:ident => $service:ident { $($(#[$fdoc:meta])* $vis:vis $field:ident: $ty:ty),* $(,)? }
        $($call:tt)*
    ) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $layer {
            $($(#[$fdoc])* $vis $field: $ty),*
        }

        impl<S> Layer<S> for $layer {
            type Service = $service<S>;

            fn layer(&self, inner: S) -> $service<S> {
                $service { inner, $($field: self.$field.clone()),* }
            }
        }

        #[derive(Clone)]
        #[doc = concat!("The service of [`", stringify!($layer), "`].")]
        pub struct $service<S> {
            inner: S,
            $($field: $ty),*
        }

        impl<S: Inner> Service<Request> for $service<S> {
            type Response = Response;
            type Error = S::Error;
            type Future = BoxFuture<S::Error>;

            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                self.inner.poll_ready(cx)
            }

            $($call)*
        }
    };
}

layer! {
    /// One span per RPC (see the module docs).
    TraceLayer => Trace {
        /// The server's own service name, for paths that name none.
        pub service: &'static str,
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (service, method) = rpc_name(&request, self.service);
        let span = ghostwriter_common::telemetry::server_span(request.headers(), &service, &method);
        let call = span.in_scope(|| take(&mut self.inner).call(request));
        Box::pin(tracing::Instrument::instrument(call, span))
    }
}

/// Counts one RPC in flight until dropped.
struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Records an RPC's outcome once, when it ends: the code its trailers (or, for an error
/// answered at once, its headers) carry, and the time from the request to that end. An RPC
/// whose response is dropped before it ended (the caller went away, the server stopped) is
/// CANCELLED.
struct Outcome {
    metrics: RpcMetrics,
    service: String,
    method: String,
    started: Instant,
    code: Option<tonic::Code>,
    _in_flight: InFlight,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        let m = &self.metrics;
        let code = self.code.unwrap_or(tonic::Code::Cancelled);
        m.requests
            .with_label_values(&[&self.service, &self.method, &format!("{code:?}")])
            .inc();
        m.duration
            .with_label_values(&[&self.service, &self.method])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// The gRPC status in `headers` (trailers, or the headers of an error answered at once).
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// A response body that records its RPC's [`Outcome`] when its trailers pass (or when it
/// ends or is dropped without them).
struct Observed {
    inner: Body,
    outcome: Option<Outcome>,
}

impl Observed {
    fn finish(&mut self, code: tonic::Code) {
        if let Some(mut outcome) = self.outcome.take() {
            outcome.code = Some(code);
        }
    }
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    // A status-less end of a gRPC response is a broken one.
                    this.finish(grpc_status(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(status))) => this.finish(status.code()),
            // Ended without trailers: the status came in the headers, or never.
            Poll::Ready(None) => this.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

layer! {
    /// Request counts, latency and in-flight gauges (see the module docs).
    MetricsLayer => Metrics {
        /// The server's own service name, for paths that name none.
        pub service: &'static str,
        /// Where they are recorded.
        pub metrics: RpcMetrics,
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let (service, method) = rpc_name(&request, self.service);
        let gauge = self.metrics.in_flight.with_label_values(&[&service]);
        gauge.inc();
        let mut outcome = Outcome {
            metrics: self.metrics.clone(),
            service,
            method,
            started: Instant::now(),
            code: None,
            _in_flight: InFlight(gauge),
        };
        let call = take(&mut self.inner).call(request);
        Box::pin(async move {
            let response = match call.await {
                Ok(r) => r,
                Err(e) => {
                    outcome.code = Some(tonic::Code::Unknown);
                    drop(outcome);
                    return Err(e);
                }
            };
            // An error answered at once carries its status in the headers (trailers-only);
            // otherwise the status comes in the trailers, at the end of the body: the RPC is
            // recorded (code, duration, in flight) when that end passes.
            if let Some(code) = grpc_status(response.headers()) {
                outcome.code = Some(code);
                drop(outcome);
                return Ok(response);
            }
            Ok(response.map(|inner| {
                Body::new(Observed {
                    inner,
                    outcome: Some(outcome),
                })
            }))
        })
    }
}

layer! {
    /// The concurrency limit (see the module docs).
    ShedLayer => Shed {
        limit: Option<Arc<Semaphore>>,
        rejected: IntCounterVec,
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Health checks and reflection are never shed: probes must see the truth under load.
        let limited = !request.uri().path().starts_with("/grpc.");
        let permit: Option<OwnedSemaphorePermit> = match (&self.limit, limited) {
            (Some(limit), true) => match limit.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let (service, _) = rpc_name(&request, "");
                    self.rejected.with_label_values(&[&service]).inc();
                    let status = ghostwriter_common::status::overloaded(format!(
                        "{service} is at its concurrency limit; retry later"
                    ));
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            },
            _ => None,
        };
        let call = take(&mut self.inner).call(request);
        Box::pin(async move { call.await.map(|r| hold(r, permit)) })
    }
}

impl ShedLayer {
    /// At most `max` RPCs at once (0 = no limit); refusals counted in `rejected` by service.
    pub fn new(max: usize, rejected: IntCounterVec) -> Self {
        Self {
            limit: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            rejected,
        }
    }
}

layer! {
    /// The caller's deadline (see the module docs).
    DeadlineLayer => Deadline {
        /// The server's own service name, for messages.
        pub service: &'static str,
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // tonic answers an expired `grpc-timeout` with CANCELLED; answer DEADLINE_EXCEEDED, as
        // gRPC specifies, by expiring a moment before tonic's own timer.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(ghostwriter_common::deadline::parse_grpc_timeout)
            .map(|d| d.saturating_sub((d / 10).min(std::time::Duration::from_millis(5))));
        let (service, _) = rpc_name(&request, self.service);
        let call = take(&mut self.inner).call(request);
        match deadline {
            None => Box::pin(call),
            Some(d) => Box::pin(async move {
                let expiry = tokio::time::Instant::now() + d;
                let expired = move || {
                    tonic::Status::deadline_exceeded(format!(
                        "{service}: the caller's deadline passed"
                    ))
                };
                match tokio::time::timeout_at(expiry, call).await {
                    // A streaming answer is bounded too: its body ends with DEADLINE_EXCEEDED
                    // in the trailers when the deadline passes mid-stream.
                    Ok(Ok(r)) => Ok(r.map(|inner| {
                        Body::new(Bounded {
                            inner,
                            timer: Box::pin(tokio::time::sleep_until(expiry)),
                            expired: Some(Box::new(expired)),
                        })
                    })),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Ok(expired().into_http()),
                }
            }),
        }
    }
}

/// A response body cut at a deadline: past it, trailers with DEADLINE_EXCEEDED end it.
struct Bounded {
    inner: Body,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The status to end with; taken when it is sent.
    expired: Option<Box<dyn FnOnce() -> tonic::Status + Send>>,
}

impl http_body::Body for Bounded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        let Some(expired) = this.expired.take() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if frame.is_some() {
                this.expired = Some(expired);
            }
            return Poll::Ready(frame);
        }
        match this.timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let mut trailers = http::HeaderMap::new();
                // The status's own headers: grpc-status, grpc-message (percent-encoded).
                let status = expired();
                let _ = status.add_header(&mut trailers);
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
            Poll::Pending => {
                this.expired = Some(expired);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

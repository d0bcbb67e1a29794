//! Logins relayed to the coordinator: a client that dials `/v1/client` without a key sends
//! its credentials first (`Login`), and this server hands them to its primary coordinator
//! link (`RelayedLogin`). The coordinator checks them and chooses a server as it does for
//! `POST /v1/login`, preferring this one. When it keeps the client here it answers with the
//! client's identity (this server asks for that, `takes_identity`), and the session starts
//! with it: no key is reserved, minted or redeemed, and the login costs the link one message
//! each way. Otherwise it answers with an offer, a key on another server (the client is
//! redirected). The coordinator opens no connection for such a login, and the client makes
//! one fewer.
//!
//! Connections waiting for their answer are bounded (`max_logins_in_flight`); over it, or
//! with no coordinator link, the upgrade is refused with `UNAVAILABLE` and the client logs in
//! with the coordinator over HTTP instead.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use relaymesh_net::queue;
use relaymesh_net::sync::lock;
use relaymesh_proto::v1::{self, ErrorCode};
use relaymesh_proto::{encode, error};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Where the coordinator put a relayed login.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Placed {
    /// Here, with this identity (boxed: it is most of the enum's size, and an offer is the
    /// other answer).
    Here(Box<v1::Identity>),
    /// On the server of this offer, with its key.
    Elsewhere(v1::ConnectOffer),
}

type Answer = Result<Placed, v1::Error>;

/// The server's relayed logins: the coordinator link they go out on, and who waits for what.
#[derive(Debug)]
pub(crate) struct Relays {
    /// The primary coordinator link's queue.
    link: Mutex<Option<queue::Sender<Bytes>>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    /// Room for connections that have not logged in yet (`max_logins_in_flight`).
    room: Arc<Semaphore>,
}

/// Why a relayed login could not be made.
fn unavailable(why: &str) -> v1::Error {
    error(
        ErrorCode::Unavailable,
        format!("{why}; log in with the coordinator"),
    )
}

/// Why a login cannot be relayed from here at all.
fn no_link() -> v1::Error {
    unavailable("this comm server has no coordinator link that takes relayed logins")
}

impl Relays {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        Self {
            link: Mutex::new(None),
            waiting: Mutex::new(HashMap::new()),
            room: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    /// Room for one more connection to log in, held until it has (or has given up); `Err`
    /// says why there is none.
    pub(crate) fn admit(&self) -> Result<OwnedSemaphorePermit, v1::Error> {
        if lock(&self.link).is_none() {
            return Err(no_link());
        }
        self.room
            .clone()
            .try_acquire_owned()
            .map_err(|_| unavailable("too many logins in flight at this comm server"))
    }

    /// The primary coordinator link is up (`Some`; `None` also for a coordinator that takes
    /// no relayed logins) or down: logins relayed over the old one are answered `UNAVAILABLE`
    /// (their clients log in with the coordinator instead).
    pub(crate) fn set_link(&self, link: Option<queue::Sender<Bytes>>) {
        // `waiting` first, as in `relay`: a login goes out on the link its entry was made
        // under, so a change of link never misses it.
        let mut waiting = lock(&self.waiting);
        *lock(&self.link) = link;
        waiting.clear();
    }

    /// Relays `login` (from a client at `from`) as request `request_id` and waits up to
    /// `within` for the coordinator's answer.
    pub(crate) async fn relay(
        &self,
        request_id: u64,
        login: v1::Login,
        from: IpAddr,
        within: Duration,
    ) -> Answer {
        let (tx, rx) = oneshot::channel();
        let link = {
            let mut waiting = lock(&self.waiting);
            let Some(link) = lock(&self.link).clone() else {
                return Err(no_link());
            };
            waiting.insert(request_id, tx);
            link
        };
        // Removes the entry however this ends: answered, timed out, or the client gone.
        let _forget = Forget {
            relays: self,
            request_id,
        };
        let msg = v1::ServerToCoordinator::relayed_login(v1::RelayedLogin {
            request_id,
            login: Some(login),
            from: from.to_string(),
            within_ms: u32::try_from(within.as_millis()).unwrap_or(u32::MAX),
            takes_identity: true,
        });
        if link.try_send(encode(&msg)).is_err() {
            return Err(unavailable("the coordinator link is busy"));
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(unavailable("the coordinator link was lost")),
            Err(_) => Err(unavailable(&format!(
                "the coordinator did not answer the login within {} ms",
                within.as_millis()
            ))),
        }
    }

    /// The coordinator answered a relayed login (one nobody waits for any more is dropped).
    pub(crate) fn answered(&self, answer: v1::RelayedLoginAnswer) {
        let Some(tx) = lock(&self.waiting).remove(&answer.request_id) else {
            return;
        };
        let result = match (answer.identity, answer.offer, answer.error) {
            (_, _, Some(e)) => Err(e),
            (Some(identity), None, None) if !identity.alias.is_empty() => {
                Ok(Placed::Here(Box::new(identity)))
            }
            (None, Some(offer), None) if !offer.key.is_empty() => Ok(Placed::Elsewhere(offer)),
            _ => Err(error(
                ErrorCode::Internal,
                "the coordinator answered the login with neither one offer, one identity nor an \
                 error",
            )),
        };
        let _ = tx.send(result);
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.waiting).len()
    }
}

struct Forget<'a> {
    relays: &'a Relays,
    request_id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(&self.relays.waiting).remove(&self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relaymesh_proto::decode;

    fn relays(max: usize) -> (Relays, queue::Receiver<Bytes>) {
        let relays = Relays::new(max);
        let (tx, rx) = queue::bounded(16);
        relays.set_link(Some(tx));
        (relays, rx)
    }

    fn relayed(frame: Bytes) -> v1::RelayedLogin {
        match decode::<v1::ServerToCoordinator>(frame)
            .expect("decodes")
            .kind
        {
            Some(v1::server_to_coordinator::Kind::RelayedLogin(r)) => r,
            other => panic!("not a RelayedLogin: {other:?}"),
        }
    }

    const FROM: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// Relays a login as `request_id` and, once it has gone out, has the coordinator answer
    /// it with `answer`.
    async fn relayed_and_answered(
        relays: &Relays,
        rx: &mut queue::Receiver<Bytes>,
        request_id: u64,
        answer: v1::RelayedLoginAnswer,
    ) -> Answer {
        let (placed, ()) = tokio::join!(
            relays.relay(
                request_id,
                v1::Login::default(),
                FROM,
                Duration::from_secs(5)
            ),
            async {
                rx.recv().await.expect("a frame");
                relays.answered(answer);
            }
        );
        placed
    }

    #[tokio::test]
    async fn a_login_goes_out_with_the_clients_address_and_gets_its_answer() {
        let (relays, mut rx) = relays(4);
        let login = v1::Login {
            client_id: "c".into(),
            ..Default::default()
        };
        let (answer, ()) = tokio::join!(
            relays.relay(7, login, FROM, Duration::from_secs(5)),
            async {
                let sent = relayed(rx.recv().await.expect("a frame"));
                assert_eq!(sent.request_id, 7);
                assert_eq!(sent.from, "127.0.0.1");
                assert_eq!(sent.login.expect("login").client_id, "c");
                assert!(sent.takes_identity, "this server takes an identity answer");
                relays.answered(v1::RelayedLoginAnswer {
                    request_id: 7,
                    identity: Some(v1::Identity {
                        alias: "a".into(),
                        client_id: "c".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        );
        let Ok(Placed::Here(identity)) = answer else {
            panic!("not placed here: {answer:?}");
        };
        assert_eq!((&*identity.alias, &*identity.client_id), ("a", "c"));
        assert_eq!(relays.waiting(), 0);
    }

    #[tokio::test]
    async fn an_offer_elsewhere_comes_back_as_it_is_and_a_malformed_answer_is_an_error() {
        let (relays, mut rx) = relays(4);
        let offer = v1::ConnectOffer {
            server_id: "s".into(),
            key: "k".into(),
            ..Default::default()
        };
        let answer = relayed_and_answered(
            &relays,
            &mut rx,
            1,
            v1::RelayedLoginAnswer {
                request_id: 1,
                offer: Some(offer.clone()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(answer.expect("placed"), Placed::Elsewhere(offer.clone()));
        // Both an offer and an identity (or an identity without an alias): neither is taken.
        for bad in [
            v1::RelayedLoginAnswer {
                request_id: 2,
                offer: Some(offer.clone()),
                identity: Some(v1::Identity {
                    alias: "a".into(),
                    ..Default::default()
                }),
                error: None,
            },
            v1::RelayedLoginAnswer {
                request_id: 2,
                identity: Some(v1::Identity::default()),
                ..Default::default()
            },
        ] {
            let answer = relayed_and_answered(&relays, &mut rx, 2, bad).await;
            assert_eq!(
                answer.expect_err("malformed").error_code(),
                ErrorCode::Internal
            );
        }
    }

    #[tokio::test]
    async fn a_refusal_comes_back_as_the_coordinators_error() {
        let (relays, mut rx) = relays(4);
        let answer = relayed_and_answered(
            &relays,
            &mut rx,
            1,
            v1::RelayedLoginAnswer {
                request_id: 1,
                error: Some(error(ErrorCode::BadCredentials, "bad code")),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            answer.expect_err("refused").error_code(),
            ErrorCode::BadCredentials
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_login_times_out_and_is_forgotten() {
        let (relays, _rx) = relays(4);
        let answer = relays
            .relay(1, v1::Login::default(), FROM, Duration::from_secs(5))
            .await;
        let e = answer.expect_err("timed out");
        assert_eq!(e.error_code(), ErrorCode::Unavailable);
        assert!(e.message.contains("within 5000 ms"), "{}", e.message);
        assert_eq!(relays.waiting(), 0);
    }

    #[tokio::test]
    async fn a_lost_link_answers_what_waits_on_it() {
        let (relays, mut rx) = relays(4);
        let (answer, ()) = tokio::join!(
            relays.relay(1, v1::Login::default(), FROM, Duration::from_secs(3600)),
            async {
                rx.recv().await.expect("a frame");
                relays.set_link(None);
            }
        );
        assert_eq!(
            answer.expect_err("unavailable").error_code(),
            ErrorCode::Unavailable
        );
        assert_eq!(
            relays.admit().expect_err("no link").error_code(),
            ErrorCode::Unavailable
        );
    }

    #[tokio::test]
    async fn logins_in_flight_are_bounded() {
        let (relays, _rx) = relays(2);
        let first = relays.admit().expect("room");
        let _second = relays.admit().expect("room");
        assert_eq!(
            relays.admit().expect_err("full").error_code(),
            ErrorCode::Unavailable
        );
        drop(first);
        assert!(relays.admit().is_ok(), "room again once one logged in");
    }
}

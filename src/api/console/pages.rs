//! The operator's console: a small single-page app (HTML, CSS, vanilla JS)
//! embedded in the binary and served at `/`. Pages are routed in the URL's
//! fragment (`/#/runs?status=Failed`), so the server needs only two routes and
//! every page and filter stays linkable. The page reads the same JSON API as
//! scripts do; it never has data of its own.

use axum::Router;
use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::AppState;

/// One embedded file: its name under `/console/assets/`, type and bytes.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX_HTML: &str = include_str!("assets/index.html");

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("assets/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("assets/icon.svg"),
    },
];

/// Only our own files run and load; nothing may frame the console (clickjacking).
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'self'";

/// The console's routes: the page at `/` and its assets.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/console/assets/{name}", get(asset))
}

fn asset_named(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "same-origin"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    match asset_named(&name) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.content_type),
                // Small files, and a new binary may change them: revalidate.
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            a.body,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("no console asset {name:?}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_assets_that_are_embedded() {
        for src in ["/console/assets/app.js", "/console/assets/app.css"] {
            assert!(INDEX_HTML.contains(src), "index.html does not load {src}");
        }
        for part in INDEX_HTML.split("/console/assets/").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.')
                .collect();
            assert!(asset_named(&name).is_some(), "{name} is not embedded");
        }
    }

    #[test]
    fn asset_names_are_lowercase_because_the_router_lowercases_paths() {
        for a in ASSETS {
            assert_eq!(a.name, a.name.to_ascii_lowercase());
            assert!(!a.body.is_empty());
        }
        assert!(asset_named("../mod.rs").is_none());
    }
}

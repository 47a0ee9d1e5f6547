//! The hot path's functions, written against the raw N-API.
//!
//! napi-rs's generated glue costs about 250 ns for a call with arguments and about 500 ns for a class
//! method (borrow scopes and type-tag checks; measured here with `bench/core.js`'s machinery), while
//! the old service answers in about 1 µs. These functions take their pool from the function's data
//! pointer and their arguments from one `napi_get_cb_info`, which costs a few tens of nanoseconds.

use std::ffi::{c_void, CStr};
use std::ptr;
use std::rc::Rc;
use std::sync::Arc;

use napi::{sys, JsError};

use crate::core::error::PoolError;
use crate::core::models::{ModelId, DEFAULT_MODEL_ID, MAX_MODELS};
use crate::core::pool::{is_integer, validate_tokens, Claim, KeyPool, Outcome};
use crate::napi::errors::BindingError;
use crate::napi::results::{Results, Slot, RESULTS_LEN};

/// A pool as one JS thread sees it: the shared pool and the result slots its calls write into.
pub struct JsPool {
  pub pool: Arc<KeyPool>,
  pub results: Results,
}

type Handler = fn(&JsPool) -> Result<Option<u32>, PoolError>;

/// The arguments JS wrote into the `arg` slots before the call (a missing one is NaN).
fn args(p: &JsPool) -> [f64; 4] {
  [Slot::Arg0, Slot::Arg1, Slot::Arg2, Slot::Arg3].map(|slot| p.results.get(slot))
}

/// Arguments: estimatedTokens, model id.
fn best(p: &JsPool) -> Result<Option<u32>, PoolError> {
  let [estimated_tokens, model, ..] = args(p);
  let claim = Claim::Reserve {
    estimated_tokens: validate_tokens(estimated_tokens)?,
  };
  let picked = p
    .pool
    .best(claim, model_id(model)?.unwrap_or(DEFAULT_MODEL_ID))?;
  p.results.write_selection(&picked.pick);
  p.results.write_figures(&picked.figures);
  Ok(Some(picked.pick.index as u32))
}

/// Arguments: key index, tokens, responseTime, model id. `responseTime` is optional: a missing one
/// reads as NaN, which is stored as 0.
fn record_success(p: &JsPool) -> Result<Option<u32>, PoolError> {
  let [index, tokens, response_time, model] = args(p);
  let tokens = validate_tokens(tokens)?;
  let figures = p.pool.record_usage(
    key_index(index)?,
    tokens,
    Outcome::Success,
    response_time,
    model_id(model)?,
  )?;
  p.results.write_figures(&figures);
  Ok(None)
}

/// Argument: key index.
fn figures(p: &JsPool) -> Result<Option<u32>, PoolError> {
  let figures = p.pool.figures(key_index(p.results.get(Slot::Arg0))?)?;
  p.results.write_figures(&figures);
  Ok(None)
}

/// A model id given as a JS number; a missing one (NaN) is none.
fn model_id(value: f64) -> Result<Option<ModelId>, PoolError> {
  if value.is_nan() {
    Ok(None)
  } else if value >= 0.0 && value < MAX_MODELS as f64 && is_integer(value) {
    Ok(Some(value as ModelId))
  } else {
    Err(PoolError::InvalidModel(format!("no model has id {value}")))
  }
}

/// A key position given as a JS number.
fn key_index(value: f64) -> Result<usize, PoolError> {
  if value >= 0.0 && value < u32::MAX as f64 && is_integer(value) {
    Ok(value as usize)
  } else {
    Err(PoolError::KeyNotFound)
  }
}

/// The function data of one installed function: which pool, and what to do.
struct Bound {
  pool: Rc<JsPool>,
  handler: Handler,
}

/// Calls the handler (its arguments are in the `arg` slots; it is passed none), and throws its error
/// into JS as every binding does (see `errors`).
unsafe extern "C" fn trampoline(
  env: sys::napi_env,
  info: sys::napi_callback_info,
) -> sys::napi_value {
  let mut data: *mut c_void = ptr::null_mut();
  // SAFETY: `info` is this call's; no arguments are asked for; `data` is the `Bound` that `install`
  // attached to this function and that lives until the function is collected.
  unsafe {
    if sys::napi_get_cb_info(
      env,
      info,
      ptr::null_mut(),
      ptr::null_mut(),
      ptr::null_mut(),
      &mut data,
    ) != sys::Status::napi_ok
      || data.is_null()
    {
      return ptr::null_mut();
    }
    let bound = &*(data as *const Bound);
    let mut result = ptr::null_mut();
    match (bound.handler)(&bound.pool) {
      Ok(Some(n)) => {
        sys::napi_create_uint32(env, n, &mut result);
      }
      Ok(None) => {
        sys::napi_get_undefined(env, &mut result);
      }
      Err(e) => JsError::from(napi::Error::from(e)).throw_into(env),
    }
    result
  }
}

unsafe extern "C" fn drop_bound(_env: sys::napi_env, data: *mut c_void, _hint: *mut c_void) {
  // SAFETY: `data` came from `Box::into_raw` in `install` and is finalized once.
  drop(unsafe { Box::from_raw(data as *mut Bound) });
}

unsafe extern "C" fn drop_pool_ref(_env: sys::napi_env, _data: *mut c_void, hint: *mut c_void) {
  // SAFETY: `hint` came from `Rc::into_raw` in `install` and is finalized once, on the JS thread.
  drop(unsafe { Rc::from_raw(hint as *const JsPool) });
}

fn check(status: sys::napi_status, what: &'static str) -> napi::Result<()> {
  if status == sys::Status::napi_ok {
    Ok(())
  } else {
    Err(BindingError::NapiCall { what, status })?
  }
}

/// Builds `{ results, best, recordSuccess, figures }` for `pool`: `results` is a `Float64Array`
/// over the pool's result slots, and each function holds the pool until it is garbage-collected, so
/// none of them can outlive the memory it writes.
///
/// # Safety
/// `env` must be the environment of the current call, on the JS thread.
pub unsafe fn install(env: sys::napi_env, pool: Rc<JsPool>) -> napi::Result<sys::napi_value> {
  const FUNCTIONS: [(&CStr, Handler); 3] = [
    (c"best", best),
    (c"recordSuccess", record_success),
    (c"figures", figures),
  ];
  unsafe {
    let mut object = ptr::null_mut();
    check(
      sys::napi_create_object(env, &mut object),
      "napi_create_object",
    )?;

    let memory = Rc::into_raw(pool.clone());
    let mut buffer = ptr::null_mut();
    let status = sys::napi_create_external_arraybuffer(
      env,
      pool.results.as_ptr().cast(),
      RESULTS_LEN * std::mem::size_of::<f64>(),
      Some(drop_pool_ref),
      memory as *mut c_void,
      &mut buffer,
    );
    if status != sys::Status::napi_ok {
      drop(Rc::from_raw(memory));
      check(status, "napi_create_external_arraybuffer")?;
    }
    let mut view = ptr::null_mut();
    check(
      sys::napi_create_typedarray(
        env,
        sys::TypedarrayType::float64_array,
        RESULTS_LEN,
        buffer,
        0,
        &mut view,
      ),
      "napi_create_typedarray",
    )?;
    check(
      sys::napi_set_named_property(env, object, c"results".as_ptr(), view),
      "napi_set_named_property",
    )?;

    for (name, handler) in FUNCTIONS {
      let bound = Box::into_raw(Box::new(Bound {
        pool: pool.clone(),
        handler,
      }));
      let mut function = ptr::null_mut();
      let status = sys::napi_create_function(
        env,
        name.as_ptr(),
        name.count_bytes() as isize,
        Some(trampoline),
        bound as *mut c_void,
        &mut function,
      );
      if status != sys::Status::napi_ok {
        drop(Box::from_raw(bound));
        check(status, "napi_create_function")?;
      }
      let status = sys::napi_add_finalizer(
        env,
        function,
        bound as *mut c_void,
        Some(drop_bound),
        ptr::null_mut(),
        ptr::null_mut(),
      );
      if status != sys::Status::napi_ok {
        drop(Box::from_raw(bound));
        check(status, "napi_add_finalizer")?;
      }
      check(
        sys::napi_set_named_property(env, object, name.as_ptr(), function),
        "napi_set_named_property",
      )?;
    }
    Ok(object)
  }
}

//! JS values as options and arguments give them: each read once (a getter runs once), checked
//! with a message that names it (napi's own conversion errors name Rust types), and quoted in that
//! message as JS would print it, masked when it could be a key.

use napi::bindgen_prelude::{FromNapiValue, JsObjectValue, JsValue, Object, Unknown};
use napi::{KeyCollectionMode, KeyConversion, KeyFilter, ValueType};
use napi_derive::napi;

use crate::core::config::js_number;
use crate::core::pool::is_integer;
use crate::mask;
use crate::napi::errors::BindingError;

/// A value as error messages quote it: a string whole or masked (see [`mask::quoted`]), numbers,
/// booleans, `null` and `undefined` as JS prints them, anything else by its type.
#[napi]
pub fn shown(value: Unknown) -> napi::Result<String> {
  Given::of(value)?.shown()
}

/// One option (or argument) as JS gave it; `None` is undefined.
pub(super) struct Given<'env> {
  value: Option<Unknown<'env>>,
  kind: ValueType,
}

impl<'env> Given<'env> {
  pub(super) fn of(value: Unknown<'env>) -> napi::Result<Self> {
    Ok(Self {
      kind: value.get_type()?,
      value: Some(value),
    })
  }

  fn undefined() -> Self {
    Self {
      value: None,
      kind: ValueType::Undefined,
    }
  }

  /// The value as `T`, when it is of `T`'s kind.
  fn as_kind<T: FromNapiValue>(&self, kind: ValueType) -> napi::Result<Option<T>> {
    match self.value {
      Some(value) if self.kind == kind => Ok(Some(T::from_unknown(value)?)),
      _ => Ok(None),
    }
  }

  pub(super) fn is_undefined(&self) -> bool {
    self.kind == ValueType::Undefined
  }

  pub(super) fn is_null(&self) -> bool {
    self.kind == ValueType::Null
  }

  /// Undefined or null: what the options that napi once converted take as not given.
  pub(super) fn is_unset(&self) -> bool {
    matches!(self.kind, ValueType::Undefined | ValueType::Null)
  }

  /// JS's `typeof`.
  pub(super) fn type_of(&self) -> &'static str {
    match self.kind {
      ValueType::Undefined => "undefined",
      ValueType::Boolean => "boolean",
      ValueType::Number => "number",
      ValueType::String => "string",
      ValueType::Symbol => "symbol",
      ValueType::Function => "function",
      ValueType::BigInt => "bigint",
      ValueType::Null | ValueType::Object | ValueType::External | ValueType::Unknown => "object",
    }
  }

  pub(super) fn shown(&self) -> napi::Result<String> {
    if let Some(text) = self.string()? {
      return Ok(mask::quoted(&text));
    }
    if let Some(n) = self.number()? {
      return Ok(js_number(n));
    }
    if let Some(b) = self.boolean()? {
      return Ok(b.to_string());
    }
    Ok(match self.kind {
      ValueType::Null => "null".to_owned(),
      _ => self.type_of().to_owned(),
    })
  }

  pub(super) fn number(&self) -> napi::Result<Option<f64>> {
    self.as_kind(ValueType::Number)
  }

  pub(super) fn string(&self) -> napi::Result<Option<String>> {
    self.as_kind(ValueType::String)
  }

  pub(super) fn boolean(&self) -> napi::Result<Option<bool>> {
    self.as_kind(ValueType::Boolean)
  }

  /// An object (arrays included), not a function.
  pub(super) fn object(&self) -> napi::Result<Option<Object<'env>>> {
    self.as_kind(ValueType::Object)
  }

  /// An array.
  pub(super) fn array(&self) -> napi::Result<Option<Object<'env>>> {
    match self.object()? {
      Some(list) if list.is_array()? => Ok(Some(list)),
      _ => Ok(None),
    }
  }

  /// A whole number in `min..2^32`.
  pub(super) fn whole(&self, min: f64) -> napi::Result<Option<u32>> {
    Ok(
      self
        .number()?
        .filter(|&n| is_integer(n) && n >= min && n < 4_294_967_296.0)
        .map(|n| n as u32),
    )
  }
}

/// The fields of an options object, read one at a time; every field of a missing object is
/// undefined.
pub(super) struct Fields<'env> {
  object: Option<Object<'env>>,
  /// How a failed check reads, given the message that names the option.
  invalid: fn(String) -> BindingError,
}

impl<'env> Fields<'env> {
  /// `options` must be an object, or undefined (or null) for none.
  pub(super) fn of(
    options: Option<Unknown<'env>>,
    invalid: fn(String) -> BindingError,
  ) -> Result<Self, BindingError> {
    let object = match options {
      None => None,
      Some(value) => {
        let given = Given::of(value)?;
        match given.object()? {
          Some(object) => Some(object),
          None if given.is_unset() => None,
          None => {
            let kind = given.type_of();
            return Err(invalid(format!("options must be an object (got {kind})")));
          }
        }
      }
    };
    Ok(Self { object, invalid })
  }

  pub(super) fn get(&self, name: &str) -> napi::Result<Given<'env>> {
    match &self.object {
      Some(object) => field(object, name),
      None => Ok(Given::undefined()),
    }
  }

  pub(super) fn fail<T>(&self, message: String) -> Result<T, BindingError> {
    Err((self.invalid)(message))
  }

  /// A string, or undefined; the message quotes the type of anything else.
  pub(super) fn string(&self, name: &str) -> Result<Option<String>, BindingError> {
    let given = self.get(name)?;
    match given.string()? {
      Some(s) => Ok(Some(s)),
      None if given.is_undefined() => Ok(None),
      None => self.fail(format!("{name} must be a string (got {})", given.type_of())),
    }
  }

  /// A boolean, or undefined; `quote` says whether the message quotes the value or its type.
  pub(super) fn boolean(&self, name: &str, quote: Quote) -> Result<Option<bool>, BindingError> {
    let given = self.get(name)?;
    match given.boolean()? {
      Some(b) => Ok(Some(b)),
      None if given.is_undefined() => Ok(None),
      None => self.fail(format!(
        "{name} must be a boolean (got {})",
        quote.of(&given)?
      )),
    }
  }

  /// A number of any value (the configuration checks it), or undefined.
  pub(super) fn number(&self, name: &str, must_be: &str) -> Result<Option<f64>, BindingError> {
    let given = self.get(name)?;
    match given.number()? {
      Some(n) => Ok(Some(n)),
      None if given.is_undefined() => Ok(None),
      None => self.fail(format!("{name} {must_be} (got {})", given.shown()?)),
    }
  }

  /// A number that `valid` accepts, or undefined.
  pub(super) fn checked_number(
    &self,
    name: &str,
    valid: fn(f64) -> bool,
    must_be: &str,
  ) -> Result<Option<f64>, BindingError> {
    let given = self.get(name)?;
    match given.number()?.filter(|&n| valid(n)) {
      Some(n) => Ok(Some(n)),
      None if given.is_undefined() => Ok(None),
      None => self.fail(format!("{name} {must_be} (got {})", given.shown()?)),
    }
  }

  /// A whole number in `min..2^32`, or undefined.
  pub(super) fn whole(
    &self,
    name: &str,
    min: f64,
    must_be: &str,
  ) -> Result<Option<u32>, BindingError> {
    let given = self.get(name)?;
    match given.whole(min)? {
      Some(n) => Ok(Some(n)),
      None if given.is_undefined() => Ok(None),
      None => self.fail(format!("{name} {must_be} (got {})", given.shown()?)),
    }
  }
}

/// The field `name` of `object`, read once.
pub(super) fn field<'env>(object: &Object<'env>, name: &str) -> napi::Result<Given<'env>> {
  Given::of(object.get_named_property::<Unknown>(name)?)
}

/// The elements of an array, read once each.
pub(super) fn elements<'env>(list: &Object<'env>) -> napi::Result<Vec<Given<'env>>> {
  (0..list.get_array_length()?)
    .map(|i| Given::of(list.get_element::<Unknown>(i)?))
    .collect()
}

/// What a type error quotes: the value, or only its type.
#[derive(Clone, Copy)]
pub(super) enum Quote {
  Value,
  Type,
}

impl Quote {
  fn of(self, given: &Given) -> napi::Result<String> {
    match self {
      Self::Value => given.shown(),
      Self::Type => Ok(given.type_of().to_owned()),
    }
  }
}

/// An object's own enumerable string keys, as `Object.keys` gives them.
pub(super) fn own_names(object: &Object) -> napi::Result<Vec<String>> {
  let names = object.get_all_property_names(
    KeyCollectionMode::OwnOnly,
    KeyFilter::Enumerable,
    KeyConversion::NumbersToStrings,
  )?;
  let mut out = Vec::new();
  // Symbols are no names here, as for `Object.keys`.
  for name in elements(&names)? {
    out.extend(name.string()?);
  }
  Ok(out)
}

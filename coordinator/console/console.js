// node_modules/@bufbuild/protobuf/dist/esm/is-message.js
function isMessage(arg, schema) {
  const isMessage2 = arg !== null && typeof arg == "object" && "$typeName" in arg && typeof arg.$typeName == "string";
  if (!isMessage2) {
    return false;
  }
  if (schema === void 0) {
    return true;
  }
  return schema.typeName === arg.$typeName;
}

// node_modules/@bufbuild/protobuf/dist/esm/descriptors.js
var ScalarType;
(function(ScalarType2) {
  ScalarType2[ScalarType2["DOUBLE"] = 1] = "DOUBLE";
  ScalarType2[ScalarType2["FLOAT"] = 2] = "FLOAT";
  ScalarType2[ScalarType2["INT64"] = 3] = "INT64";
  ScalarType2[ScalarType2["UINT64"] = 4] = "UINT64";
  ScalarType2[ScalarType2["INT32"] = 5] = "INT32";
  ScalarType2[ScalarType2["FIXED64"] = 6] = "FIXED64";
  ScalarType2[ScalarType2["FIXED32"] = 7] = "FIXED32";
  ScalarType2[ScalarType2["BOOL"] = 8] = "BOOL";
  ScalarType2[ScalarType2["STRING"] = 9] = "STRING";
  ScalarType2[ScalarType2["BYTES"] = 12] = "BYTES";
  ScalarType2[ScalarType2["UINT32"] = 13] = "UINT32";
  ScalarType2[ScalarType2["SFIXED32"] = 15] = "SFIXED32";
  ScalarType2[ScalarType2["SFIXED64"] = 16] = "SFIXED64";
  ScalarType2[ScalarType2["SINT32"] = 17] = "SINT32";
  ScalarType2[ScalarType2["SINT64"] = 18] = "SINT64";
})(ScalarType || (ScalarType = {}));

// node_modules/@bufbuild/protobuf/dist/esm/wire/varint.js
function varint64read() {
  const buf = this.buf;
  let pos = this.pos;
  let lo = 0;
  let hi = 0;
  for (let shift = 0; shift < 28; shift += 7) {
    const b = buf[pos++];
    lo |= (b & 127) << shift;
    if ((b & 128) == 0) {
      this.pos = pos;
      this.assertBounds();
      this.varint64Lo = lo;
      this.varint64Hi = hi;
      return;
    }
  }
  const middleByte = buf[pos++];
  lo |= (middleByte & 15) << 28;
  hi = (middleByte & 112) >> 4;
  if ((middleByte & 128) == 0) {
    this.pos = pos;
    this.assertBounds();
    this.varint64Lo = lo;
    this.varint64Hi = hi;
    return;
  }
  for (let shift = 3; shift <= 31; shift += 7) {
    const b = buf[pos++];
    hi |= (b & 127) << shift;
    if ((b & 128) == 0) {
      this.pos = pos;
      this.assertBounds();
      this.varint64Lo = lo;
      this.varint64Hi = hi;
      return;
    }
  }
  throw new Error("invalid varint");
}
var TWO_PWR_32_DBL = 4294967296;
function int64FromString(dec) {
  const minus = dec[0] === "-";
  if (minus) {
    dec = dec.slice(1);
  }
  const base = 1e6;
  let lowBits = 0;
  let highBits = 0;
  function add1e6digit(begin, end) {
    const digit1e6 = Number(dec.slice(begin, end));
    highBits *= base;
    lowBits = lowBits * base + digit1e6;
    if (lowBits >= TWO_PWR_32_DBL) {
      highBits = highBits + (lowBits / TWO_PWR_32_DBL | 0);
      lowBits = lowBits % TWO_PWR_32_DBL;
    }
  }
  add1e6digit(-24, -18);
  add1e6digit(-18, -12);
  add1e6digit(-12, -6);
  add1e6digit(-6);
  return minus ? negate(lowBits, highBits) : newBits(lowBits, highBits);
}
function int64ToString(lo, hi) {
  let bits = newBits(lo, hi);
  const negative = bits.hi & 2147483648;
  if (negative) {
    bits = negate(bits.lo, bits.hi);
  }
  const result = uInt64ToString(bits.lo, bits.hi);
  return negative ? "-" + result : result;
}
function uInt64ToString(lo, hi) {
  ({ lo, hi } = toUnsigned(lo, hi));
  if (hi <= 2097151) {
    return String(TWO_PWR_32_DBL * hi + lo);
  }
  const low = lo & 16777215;
  const mid = (lo >>> 24 | hi << 8) & 16777215;
  const high = hi >> 16 & 65535;
  let digitA = low + mid * 6777216 + high * 6710656;
  let digitB = mid + high * 8147497;
  let digitC = high * 2;
  const base = 1e7;
  if (digitA >= base) {
    digitB += Math.floor(digitA / base);
    digitA %= base;
  }
  if (digitB >= base) {
    digitC += Math.floor(digitB / base);
    digitB %= base;
  }
  return digitC.toString() + decimalFrom1e7WithLeadingZeros(digitB) + decimalFrom1e7WithLeadingZeros(digitA);
}
function toUnsigned(lo, hi) {
  return { lo: lo >>> 0, hi: hi >>> 0 };
}
function newBits(lo, hi) {
  return { lo: lo | 0, hi: hi | 0 };
}
function negate(lowBits, highBits) {
  highBits = ~highBits;
  if (lowBits) {
    lowBits = ~lowBits + 1;
  } else {
    highBits += 1;
  }
  return newBits(lowBits, highBits);
}
var decimalFrom1e7WithLeadingZeros = (digit1e7) => {
  const partial = String(digit1e7);
  return "0000000".slice(partial.length) + partial;
};
function varint32write(value, bytes) {
  if (value >>> 0 < 128) {
    bytes.push(value);
    return;
  }
  if (value >= 0) {
    while (value > 127) {
      bytes.push(value & 127 | 128);
      value = value >>> 7;
    }
    bytes.push(value);
  } else {
    for (let i = 0; i < 9; i++) {
      bytes.push(value & 127 | 128);
      value = value >> 7;
    }
    bytes.push(1);
  }
}
function varint32read() {
  let b = this.buf[this.pos++];
  if ((b & 128) === 0) {
    this.assertBounds();
    return b;
  }
  let result = b & 127;
  b = this.buf[this.pos++];
  result |= (b & 127) << 7;
  if ((b & 128) === 0) {
    this.assertBounds();
    return result;
  }
  b = this.buf[this.pos++];
  result |= (b & 127) << 14;
  if ((b & 128) === 0) {
    this.assertBounds();
    return result;
  }
  b = this.buf[this.pos++];
  result |= (b & 127) << 21;
  if ((b & 128) === 0) {
    this.assertBounds();
    return result;
  }
  b = this.buf[this.pos++];
  result |= (b & 15) << 28;
  for (let readBytes = 5; (b & 128) !== 0 && readBytes < 10; readBytes++)
    b = this.buf[this.pos++];
  if ((b & 128) !== 0)
    throw new Error("invalid varint");
  this.assertBounds();
  return result >>> 0;
}

// node_modules/@bufbuild/protobuf/dist/esm/proto-int64.js
var protoInt64 = /* @__PURE__ */ makeInt64Support();
function makeInt64Support() {
  const dv = new DataView(new ArrayBuffer(8));
  const ok = typeof BigInt === "function" && typeof dv.getBigInt64 === "function" && typeof dv.getBigUint64 === "function" && typeof dv.setBigInt64 === "function" && typeof dv.setBigUint64 === "function" && (!!globalThis.Deno || !!globalThis.Bun || typeof process != "object" || typeof process.env != "object" || process.env.BUF_BIGINT_DISABLE !== "1");
  if (ok) {
    const MIN = BigInt("-9223372036854775808");
    const MAX = BigInt("9223372036854775807");
    const UMIN = BigInt("0");
    const UMAX = BigInt("18446744073709551615");
    return {
      zero: BigInt(0),
      supported: true,
      parse(value) {
        const bi = typeof value == "bigint" ? value : BigInt(value);
        if (bi > MAX || bi < MIN) {
          throw new Error(`invalid int64: ${value}`);
        }
        return bi;
      },
      uParse(value) {
        const bi = typeof value == "bigint" ? value : BigInt(value);
        if (bi > UMAX || bi < UMIN) {
          throw new Error(`invalid uint64: ${value}`);
        }
        return bi;
      },
      enc(value) {
        dv.setBigInt64(0, this.parse(value), true);
        return {
          lo: dv.getInt32(0, true),
          hi: dv.getInt32(4, true)
        };
      },
      uEnc(value) {
        dv.setBigInt64(0, this.uParse(value), true);
        return {
          lo: dv.getInt32(0, true),
          hi: dv.getInt32(4, true)
        };
      },
      dec(lo, hi) {
        dv.setInt32(0, lo, true);
        dv.setInt32(4, hi, true);
        return dv.getBigInt64(0, true);
      },
      uDec(lo, hi) {
        dv.setInt32(0, lo, true);
        dv.setInt32(4, hi, true);
        return dv.getBigUint64(0, true);
      }
    };
  }
  return {
    zero: "0",
    supported: false,
    parse(value) {
      if (typeof value != "string") {
        value = value.toString();
      }
      assertInt64String(value);
      return value;
    },
    uParse(value) {
      if (typeof value != "string") {
        value = value.toString();
      }
      assertUInt64String(value);
      return value;
    },
    enc(value) {
      if (typeof value != "string") {
        value = value.toString();
      }
      assertInt64String(value);
      return int64FromString(value);
    },
    uEnc(value) {
      if (typeof value != "string") {
        value = value.toString();
      }
      assertUInt64String(value);
      return int64FromString(value);
    },
    dec(lo, hi) {
      return int64ToString(lo, hi);
    },
    uDec(lo, hi) {
      return uInt64ToString(lo, hi);
    }
  };
}
function assertInt64String(value) {
  if (!/^-?[0-9]+$/.test(value)) {
    throw new Error("invalid int64: " + value);
  }
}
function assertUInt64String(value) {
  if (!/^[0-9]+$/.test(value)) {
    throw new Error("invalid uint64: " + value);
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/scalar.js
function scalarZeroValue(type, longAsString) {
  switch (type) {
    case ScalarType.STRING:
      return "";
    case ScalarType.BOOL:
      return false;
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return 0;
    case ScalarType.INT64:
    case ScalarType.UINT64:
    case ScalarType.SFIXED64:
    case ScalarType.FIXED64:
    case ScalarType.SINT64:
      return longAsString ? "0" : protoInt64.zero;
    case ScalarType.BYTES:
      return new Uint8Array(0);
    default:
      return 0;
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/unsafe.js
function unsafeIsSetExplicit(target, localName) {
  return Object.prototype.hasOwnProperty.call(target, localName) && target[localName] !== void 0;
}
function setOwn(obj, key, value) {
  if (key === "__proto__") {
    Object.defineProperty(obj, "__proto__", {
      value,
      writable: true,
      enumerable: true,
      configurable: true
    });
  } else {
    obj[key] = value;
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/guard.js
function isObject(arg) {
  return arg !== null && typeof arg == "object" && !Array.isArray(arg);
}

// node_modules/@bufbuild/protobuf/dist/esm/wkt/wrappers.js
function isWrapperDesc(messageDesc2) {
  const f = messageDesc2.fields[0];
  return isWrapperTypeName(messageDesc2.typeName) && f !== void 0 && f.fieldKind == "scalar" && f.name == "value" && f.number == 1;
}
var wrapperTypeNames = /* @__PURE__ */ new Set([
  "google.protobuf.DoubleValue",
  "google.protobuf.FloatValue",
  "google.protobuf.Int64Value",
  "google.protobuf.UInt64Value",
  "google.protobuf.Int32Value",
  "google.protobuf.UInt32Value",
  "google.protobuf.BoolValue",
  "google.protobuf.StringValue",
  "google.protobuf.BytesValue"
]);
function isWrapperTypeName(name) {
  return wrapperTypeNames.has(name);
}

// node_modules/@bufbuild/protobuf/dist/esm/create.js
var EDITION_PROTO3 = 999;
var EDITION_PROTO2 = 998;
var IMPLICIT = 2;
function create(schema, init) {
  if (isMessage(init, schema)) {
    return init;
  }
  return compiledCreate(schema)(init);
}
var compiledCreates = /* @__PURE__ */ new WeakMap();
function compiledCreate(desc) {
  let compiled = compiledCreates.get(desc);
  if (compiled === void 0) {
    compiled = compileCreate(desc);
    compiledCreates.set(desc, compiled);
  }
  return compiled;
}
var INIT_SINGULAR = 0;
var INIT_LIST = 1;
var INIT_MAP = 2;
var INIT_ONEOF = 3;
function compileCreate(desc) {
  const typeName = desc.typeName;
  const { properties, prototype } = compileInitMessage(desc);
  return (init) => {
    let message;
    if (prototype !== void 0) {
      message = Object.create(prototype);
      message.$typeName = typeName;
    } else {
      message = { $typeName: typeName };
    }
    for (let i = 0; i < properties.length; i++) {
      const property = properties[i];
      const name = property.name;
      const initValue = init === null || init === void 0 ? void 0 : init[name];
      switch (property.kind) {
        case INIT_SINGULAR:
          if (initValue != null) {
            message[name] = property.convert !== void 0 ? property.convert(initValue) : initValue;
          } else if (property.constant !== void 0) {
            message[name] = property.constant;
          }
          break;
        case INIT_LIST:
          message[name] = property.convert !== void 0 && Array.isArray(initValue) ? initValue.map(property.convert) : initValue !== null && initValue !== void 0 ? initValue : [];
          break;
        case INIT_MAP:
          if (property.convert === void 0 || !isObject(initValue)) {
            message[name] = initValue !== null && initValue !== void 0 ? initValue : {};
          } else {
            const converted = {};
            const keys = Object.keys(initValue);
            for (let k = 0; k < keys.length; k++) {
              setOwn(converted, keys[k], property.convert(initValue[keys[k]]));
            }
            message[name] = converted;
          }
          break;
        case INIT_ONEOF: {
          const oneofValue = initValue;
          if ((oneofValue === null || oneofValue === void 0 ? void 0 : oneofValue.case) != null) {
            const convert = property.convert.get(oneofValue.case);
            if (convert !== void 0) {
              message[name] = {
                case: oneofValue.case,
                value: convert(oneofValue.value)
              };
              break;
            }
          }
          message[name] = { case: void 0 };
          break;
        }
      }
    }
    return message;
  };
}
function compileInitMessage(desc) {
  var _a, _b;
  const properties = [];
  const prototype = {};
  const usePrototype = needsPrototypeChain(desc);
  for (const member of desc.members) {
    const name = member.localName;
    if (member.kind == "oneof") {
      properties.push({
        name,
        kind: INIT_ONEOF,
        constant: void 0,
        convert: compileConvertOneof(member)
      });
      continue;
    }
    switch (member.fieldKind) {
      case "message": {
        properties.push({
          name,
          kind: INIT_SINGULAR,
          constant: void 0,
          convert: compileConvertMessage(member)
        });
        break;
      }
      case "list": {
        properties.push({
          name,
          kind: INIT_LIST,
          constant: void 0,
          convert: member.listKind == "message" ? (_a = compileConvertMessage(member)) !== null && _a !== void 0 ? _a : ((value) => value) : member.scalar == ScalarType.BYTES ? toU8Arr : void 0
        });
        break;
      }
      case "map": {
        properties.push({
          name,
          kind: INIT_MAP,
          constant: void 0,
          convert: member.mapKind == "message" ? (_b = compileConvertMessage(member)) !== null && _b !== void 0 ? _b : ((value) => value) : member.scalar == ScalarType.BYTES ? toU8Arr : void 0
        });
        break;
      }
      default: {
        const zeroValue = createZeroValue(member);
        properties.push({
          name,
          kind: INIT_SINGULAR,
          constant: member.presence == IMPLICIT ? zeroValue : void 0,
          convert: member.fieldKind == "scalar" && member.scalar == ScalarType.BYTES ? toU8Arr : void 0
        });
        if (usePrototype) {
          prototype[name] = zeroValue;
        }
        break;
      }
    }
  }
  return {
    properties,
    prototype: usePrototype ? prototype : void 0
  };
}
function compileConvertOneof(oneof) {
  const converters = /* @__PURE__ */ new Map();
  for (const field of oneof.fields) {
    let convert;
    if (field.fieldKind == "message") {
      convert = compileConvertMessage(field);
    } else if (field.fieldKind == "scalar" && field.scalar == ScalarType.BYTES) {
      convert = toU8Arr;
    }
    converters.set(field.localName, convert !== null && convert !== void 0 ? convert : ((value) => value));
  }
  return converters;
}
function compileConvertMessage(field) {
  if (field.fieldKind == "message" && !field.oneof && isWrapperDesc(field.message)) {
    return field.message.fields[0].scalar == ScalarType.BYTES ? toU8Arr : void 0;
  }
  if (field.message.typeName == "google.protobuf.Struct" && field.parent.typeName !== "google.protobuf.Value") {
    return void 0;
  }
  const messageDesc2 = field.message;
  let compiled;
  return (value) => {
    if (!isObject(value) || isMessage(value, messageDesc2)) {
      return value;
    }
    compiled !== null && compiled !== void 0 ? compiled : compiled = compiledCreate(messageDesc2);
    return compiled(value);
  };
}
function toU8Arr(value) {
  return Array.isArray(value) ? new Uint8Array(value) : value;
}
function needsPrototypeChain(desc) {
  switch (desc.file.edition) {
    case EDITION_PROTO3:
      return false;
    case EDITION_PROTO2:
      return true;
    default:
      return desc.fields.some((f) => f.presence != IMPLICIT && f.fieldKind != "message" && !f.oneof);
  }
}
function createZeroValue(field) {
  const defaultValue = field.getDefaultValue();
  if (defaultValue !== void 0) {
    return field.fieldKind == "scalar" && field.longAsString ? defaultValue.toString() : defaultValue;
  }
  return field.fieldKind == "scalar" ? scalarZeroValue(field.scalar, field.longAsString) : field.enum.values[0].number;
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/error.js
var FieldError = class extends Error {
  constructor(fieldOrOneof, message, name = "FieldValueInvalidError") {
    super(message);
    this.name = name;
    this.field = () => fieldOrOneof;
  }
};

// node_modules/@bufbuild/protobuf/dist/esm/wire/text-encoding.js
var te;
function configureTextEncoding(textEncoding) {
  var _a;
  te = Object.assign(Object.assign({}, textEncoding), { encodeUtf8Into: (_a = textEncoding.encodeUtf8Into) !== null && _a !== void 0 ? _a : emulateEncodeInto(textEncoding.encodeUtf8.bind(textEncoding)) });
}
function getTextEncoding() {
  if (!te) {
    const globals = globalThis;
    if (!globals.TextEncoder || !globals.TextDecoder) {
      throw new Error("encoding API missing: install TextEncoder and TextDecoder on globalThis");
    }
    const textEncoder = new globals.TextEncoder();
    const textDecoder2 = new globals.TextDecoder("utf-8", {
      ignoreBOM: true
    });
    let textDecoderStrict;
    const config = {
      encodeUtf8(text) {
        return textEncoder.encode(text);
      },
      decodeUtf8(bytes, strict) {
        if (strict) {
          if (!textDecoderStrict) {
            textDecoderStrict = new globals.TextDecoder("utf-8", {
              fatal: true,
              ignoreBOM: true
            });
          }
          return textDecoderStrict.decode(bytes);
        }
        return textDecoder2.decode(bytes);
      },
      checkUtf8(text) {
        try {
          encodeURIComponent(text);
          return true;
        } catch (_) {
          return false;
        }
      }
    };
    if (textEncoder.encodeInto) {
      config.encodeUtf8Into = textEncoder.encodeInto.bind(textEncoder);
    }
    const nativeStringIsWellFormed = String.prototype.isWellFormed;
    if (nativeStringIsWellFormed) {
      config.checkUtf8 = (text) => {
        return nativeStringIsWellFormed.call(text);
      };
    }
    configureTextEncoding(config);
  }
  return te;
}
function emulateEncodeInto(encodeUtf8) {
  return (text, dest) => {
    const bytes = encodeUtf8(text);
    dest.set(bytes);
    return { written: bytes.byteLength };
  };
}

// node_modules/@bufbuild/protobuf/dist/esm/wire/binary-encoding.js
var WireType;
(function(WireType2) {
  WireType2[WireType2["Varint"] = 0] = "Varint";
  WireType2[WireType2["Bit64"] = 1] = "Bit64";
  WireType2[WireType2["LengthDelimited"] = 2] = "LengthDelimited";
  WireType2[WireType2["StartGroup"] = 3] = "StartGroup";
  WireType2[WireType2["EndGroup"] = 4] = "EndGroup";
  WireType2[WireType2["Bit32"] = 5] = "Bit32";
})(WireType || (WireType = {}));
var UINT32_MAX = 4294967295;
var INT32_MAX = 2147483647;
var INT32_MIN = -2147483648;
var BinaryWriter = class {
  constructor(encodeUtf8) {
    this.stackPos = [];
    this.encodeUtf8Into = encodeUtf8 ? emulateEncodeInto(encodeUtf8) : getTextEncoding().encodeUtf8Into;
    this.buffer = EMPTY_BUFFER;
    this.viewCache = EMPTY_VIEW;
    this.pos = 0;
  }
  ensureCapacity(size) {
    const required = this.pos + size;
    if (required > this.buffer.length) {
      let newLen = this.buffer.length || INITIAL_SIZE;
      while (newLen < required)
        newLen *= 2;
      const newBuf = new Uint8Array(newLen);
      if (this.pos > 0)
        newBuf.set(this.buffer);
      this.buffer = newBuf;
    }
  }
  /**
   * The DataView over `buffer`, rebuilt only if the buffer has grown since it
   * was last used.
   */
  view() {
    const bytes = this.buffer;
    const view = this.viewCache;
    if (view.byteLength === bytes.byteLength)
      return view;
    const newView = new DataView(bytes.buffer);
    this.viewCache = newView;
    return newView;
  }
  /**
   * Return all bytes written and reset this writer.
   */
  finish() {
    const result = this.buffer.slice(0, this.pos);
    this.pos = 0;
    this.stackPos = [];
    return result;
  }
  /**
   * Start a new fork for length-delimited data like a message
   * or a packed repeated field.
   *
   * Must be joined later with `join()`.
   */
  fork() {
    this.stackPos.push(this.pos);
    this.ensureCapacity(DEFAULT_LEN_PREFIX_SIZE);
    this.buffer[this.pos++] = 0;
    return this;
  }
  /**
   * Join the last fork. Write its length and bytes, then
   * return to the previous state.
   */
  join() {
    const forkPos = this.stackPos.pop();
    if (forkPos === void 0)
      throw new Error("invalid state, fork stack empty");
    const len = this.pos - forkPos - DEFAULT_LEN_PREFIX_SIZE;
    const lenPrefixSize = varint32Size(len);
    if (lenPrefixSize > DEFAULT_LEN_PREFIX_SIZE) {
      this.ensureCapacity(lenPrefixSize - DEFAULT_LEN_PREFIX_SIZE);
      this.buffer.copyWithin(forkPos + lenPrefixSize, forkPos + DEFAULT_LEN_PREFIX_SIZE, this.pos);
    }
    this.pos = forkPos;
    this.uint32(len);
    this.pos += len;
    return this;
  }
  /**
   * Writes a tag (field number and wire type).
   *
   * Equivalent to `uint32( (fieldNo << 3 | type) >>> 0 )`.
   *
   * Generated code should compute the tag ahead of time and call `uint32()`.
   */
  tag(fieldNo, type) {
    return this.uint32((fieldNo << 3 | type) >>> 0);
  }
  /**
   * Write a chunk of raw bytes.
   */
  raw(chunk) {
    this.ensureCapacity(chunk.length);
    this.buffer.set(chunk, this.pos);
    this.pos += chunk.length;
    return this;
  }
  /**
   * Write a `uint32` value, an unsigned 32 bit varint.
   */
  uint32(value) {
    assertUInt32(value);
    this.ensureCapacity(5);
    if (value < 128) {
      this.buffer[this.pos++] = value;
      return this;
    }
    while (value > 127) {
      this.buffer[this.pos++] = value & 127 | 128;
      value >>>= 7;
    }
    this.buffer[this.pos++] = value;
    return this;
  }
  /**
   * Write a `int32` value, a signed 32 bit varint.
   */
  int32(value) {
    assertInt32(value);
    if (value >= 0) {
      return this.uint32(value);
    }
    this.ensureCapacity(10);
    for (let i = 0; i < 9; i++) {
      this.buffer[this.pos++] = value & 127 | 128;
      value >>= 7;
    }
    this.buffer[this.pos++] = 1;
    return this;
  }
  /**
   * Write a `bool` value, a varint.
   */
  bool(value) {
    this.ensureCapacity(1);
    this.buffer[this.pos++] = value ? 1 : 0;
    return this;
  }
  /**
   * Write a `bytes` value, length-delimited arbitrary data.
   */
  bytes(value) {
    this.uint32(value.byteLength);
    return this.raw(value);
  }
  /**
   * Write a `string` value, length-delimited data converted to UTF-8 text.
   */
  string(value) {
    if (typeof value !== "string") {
      value = String(value);
    }
    const len = value.length;
    if (len <= ASCII_MAX_LENGTH) {
      this.ensureCapacity(len + 1);
      const ascii = this.buffer;
      let pos = this.pos;
      ascii[pos++] = len;
      let i = 0;
      for (; i < len; i++) {
        const code = value.charCodeAt(i);
        if (code > 127)
          break;
        ascii[pos++] = code;
      }
      if (i == len) {
        this.pos = pos;
        return this;
      }
    }
    this.ensureCapacity(len * 3 + 5);
    const lenPrefixSizeGuess = varint32Size(len);
    const buf = this.buffer;
    const start = this.pos;
    const { written } = this.encodeUtf8Into(value, buf.subarray(start + lenPrefixSizeGuess));
    const lenPrefixSize = varint32Size(written);
    if (lenPrefixSize != lenPrefixSizeGuess) {
      buf.copyWithin(start + lenPrefixSize, start + lenPrefixSizeGuess, start + lenPrefixSizeGuess + written);
    }
    this.uint32(written);
    this.pos += written;
    return this;
  }
  /**
   * Write a `float` value, 32-bit floating point number.
   */
  float(value) {
    assertFloat32(value);
    this.ensureCapacity(4);
    this.view().setFloat32(this.pos, value, true);
    this.pos += 4;
    return this;
  }
  /**
   * Write a `double` value, a 64-bit floating point number.
   */
  double(value) {
    this.ensureCapacity(8);
    this.view().setFloat64(this.pos, value, true);
    this.pos += 8;
    return this;
  }
  /**
   * Write a `fixed32` value, an unsigned, fixed-length 32-bit integer.
   */
  fixed32(value) {
    assertUInt32(value);
    this.ensureCapacity(4);
    this.view().setUint32(this.pos, value, true);
    this.pos += 4;
    return this;
  }
  /**
   * Write a `sfixed32` value, a signed, fixed-length 32-bit integer.
   */
  sfixed32(value) {
    assertInt32(value);
    this.ensureCapacity(4);
    this.view().setInt32(this.pos, value, true);
    this.pos += 4;
    return this;
  }
  /**
   * Write a `sint32` value, a signed, zigzag-encoded 32-bit varint.
   */
  sint32(value) {
    assertInt32(value);
    return this.uint32((value << 1 ^ value >> 31) >>> 0);
  }
  /**
   * Write a `sfixed64` value, a signed, fixed-length 64-bit integer.
   */
  sfixed64(value) {
    const tc = protoInt64.enc(value);
    this.ensureCapacity(8);
    const view = this.view();
    view.setInt32(this.pos, tc.lo, true);
    view.setInt32(this.pos + 4, tc.hi, true);
    this.pos += 8;
    return this;
  }
  /**
   * Write a `fixed64` value, an unsigned, fixed-length 64 bit integer.
   */
  fixed64(value) {
    const tc = protoInt64.uEnc(value);
    this.ensureCapacity(8);
    const view = this.view();
    view.setInt32(this.pos, tc.lo, true);
    view.setInt32(this.pos + 4, tc.hi, true);
    this.pos += 8;
    return this;
  }
  /**
   * Write a `int64` value, a signed 64-bit varint.
   */
  int64(value) {
    const tc = protoInt64.enc(value);
    return this.writeVarint64(tc.lo, tc.hi);
  }
  /**
   * Write a `sint64` value, a signed, zig-zag-encoded 64-bit varint.
   */
  sint64(value) {
    const tc = protoInt64.enc(value), sign = tc.hi >> 31, lo = tc.lo << 1 ^ sign, hi = (tc.hi << 1 | tc.lo >>> 31) ^ sign;
    return this.writeVarint64(lo, hi);
  }
  /**
   * Write a `uint64` value, an unsigned 64-bit varint.
   */
  uint64(value) {
    const tc = protoInt64.uEnc(value);
    return this.writeVarint64(tc.lo, tc.hi);
  }
  /**
   * Write a 64-bit varint directly into the buffer. Accepts the value as
   * split low/high 32-bit words.
   *
   * Ported from varint64write() to avoid the intermediate number[] buffer.
   * See https://github.com/protocolbuffers/protobuf/blob/8a71927d74a4ce34efe2d8769fda198f52d20d12/js/experimental/runtime/kernel/writer.js#L344
   */
  writeVarint64(lo, hi) {
    this.ensureCapacity(10);
    const buf = this.buffer;
    let pos = this.pos;
    for (let i = 0; i < 28; i = i + 7) {
      const shift = lo >>> i;
      const hasNext = !(shift >>> 7 == 0 && hi == 0);
      buf[pos++] = (hasNext ? shift | 128 : shift) & 255;
      if (!hasNext) {
        this.pos = pos;
        return this;
      }
    }
    const splitBits = lo >>> 28 & 15 | (hi & 7) << 4;
    const hasMoreBits = !(hi >> 3 == 0);
    buf[pos++] = (hasMoreBits ? splitBits | 128 : splitBits) & 255;
    if (!hasMoreBits) {
      this.pos = pos;
      return this;
    }
    for (let i = 3; i < 31; i = i + 7) {
      const shift = hi >>> i;
      const hasNext = !(shift >>> 7 == 0);
      buf[pos++] = (hasNext ? shift | 128 : shift) & 255;
      if (!hasNext) {
        this.pos = pos;
        return this;
      }
    }
    buf[pos++] = hi >>> 31 & 1;
    this.pos = pos;
    return this;
  }
};
var INITIAL_SIZE = 128;
var DEFAULT_LEN_PREFIX_SIZE = 1;
var EMPTY_BUFFER = new Uint8Array(0);
var EMPTY_VIEW = new DataView(EMPTY_BUFFER.buffer);
var ASCII_MAX_LENGTH = 32;
function varint32Size(value) {
  if (value < 128)
    return 1;
  if (value < 16384)
    return 2;
  if (value < 2097152)
    return 3;
  if (value < 268435456)
    return 4;
  return 5;
}
var BinaryReader = class {
  constructor(buf, decodeUtf8 = getTextEncoding().decodeUtf8) {
    this.decodeUtf8 = decodeUtf8;
    this.varint64Lo = 0;
    this.varint64Hi = 0;
    this.varint64 = varint64read;
    this.uint32 = varint32read;
    this.buf = buf;
    this.len = buf.length;
    this.pos = 0;
    this.view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  }
  /**
   * Reads a tag - field number and wire type. Tags are uint32 varints; values
   * that do not fit in uint32 are rejected.
   */
  tag() {
    const start = this.pos;
    const tag = this.uint32();
    const bytesRead = this.pos - start;
    if (bytesRead > 5 || bytesRead == 5 && this.buf[this.pos - 1] > 15) {
      throw new Error("illegal tag: varint overflows uint32");
    }
    const fieldNo = tag >>> 3;
    const wireType = tag & 7;
    if (fieldNo <= 0 || wireType > 5) {
      throw new Error("illegal tag: field no " + fieldNo + " wire type " + wireType);
    }
    return [fieldNo, wireType];
  }
  /**
   * Skip one element and return the skipped data.
   *
   * When skipping StartGroup, provide the tags field number to check for
   * matching field number in the EndGroup tag. Recursion into nested groups
   * is guarded by the `recursionLimit` argument: When the limit is reached,
   * this method throws.
   */
  skip(wireType, fieldNo, recursionLimit = 100) {
    let start = this.pos;
    switch (wireType) {
      case WireType.Varint:
        while (this.buf[this.pos++] & 128) {
        }
        break;
      // @ts-ignore TS7029: Fallthrough case in switch -- ignore instead of expect-error for compiler settings without noFallthroughCasesInSwitch: true
      case WireType.Bit64:
        this.pos += 4;
      case WireType.Bit32:
        this.pos += 4;
        break;
      case WireType.LengthDelimited:
        let len = this.uint32();
        this.pos += len;
        break;
      case WireType.StartGroup:
        if (recursionLimit <= 0) {
          throw new Error("maximum recursion depth reached");
        }
        for (; ; ) {
          const [fn, wt] = this.tag();
          if (wt === WireType.EndGroup) {
            if (fieldNo !== void 0 && fn !== fieldNo) {
              throw new Error("invalid end group tag");
            }
            break;
          }
          this.skip(wt, fn, recursionLimit - 1);
        }
        break;
      default:
        throw new Error("cant skip wire type " + wireType);
    }
    this.assertBounds();
    return this.buf.subarray(start, this.pos);
  }
  /**
   * Throws error if position in byte array is out of range.
   */
  assertBounds() {
    if (this.pos > this.len)
      throw new RangeError("premature EOF");
  }
  /**
   * Read a `int32` field, a signed 32 bit varint.
   */
  int32() {
    return this.uint32() | 0;
  }
  /**
   * Read a `sint32` field, a signed, zigzag-encoded 32-bit varint.
   */
  sint32() {
    let zze = this.uint32();
    return zze >>> 1 ^ -(zze & 1);
  }
  /**
   * Read a `int64` field, a signed 64-bit varint.
   */
  int64() {
    this.varint64();
    return protoInt64.dec(this.varint64Lo, this.varint64Hi);
  }
  /**
   * Read a `uint64` field, an unsigned 64-bit varint.
   */
  uint64() {
    this.varint64();
    return protoInt64.uDec(this.varint64Lo, this.varint64Hi);
  }
  /**
   * Read a `sint64` field, a signed, zig-zag-encoded 64-bit varint.
   */
  sint64() {
    this.varint64();
    let lo = this.varint64Lo;
    let hi = this.varint64Hi;
    let s = -(lo & 1);
    lo = (lo >>> 1 | (hi & 1) << 31) ^ s;
    hi = hi >>> 1 ^ s;
    return protoInt64.dec(lo, hi);
  }
  /**
   * Read a `bool` field, a variant.
   */
  bool() {
    const b = this.buf[this.pos];
    if (b < 128) {
      this.pos++;
      return b !== 0;
    }
    this.varint64();
    return this.varint64Lo !== 0 || this.varint64Hi !== 0;
  }
  /**
   * Read a `fixed32` field, an unsigned, fixed-length 32-bit integer.
   */
  fixed32() {
    return this.view.getUint32((this.pos += 4) - 4, true);
  }
  /**
   * Read a `sfixed32` field, a signed, fixed-length 32-bit integer.
   */
  sfixed32() {
    return this.view.getInt32((this.pos += 4) - 4, true);
  }
  /**
   * Read a `fixed64` field, an unsigned, fixed-length 64 bit integer.
   */
  fixed64() {
    return protoInt64.uDec(this.sfixed32(), this.sfixed32());
  }
  /**
   * Read a `fixed64` field, a signed, fixed-length 64-bit integer.
   */
  sfixed64() {
    return protoInt64.dec(this.sfixed32(), this.sfixed32());
  }
  /**
   * Read a `float` field, 32-bit floating point number.
   */
  float() {
    return this.view.getFloat32((this.pos += 4) - 4, true);
  }
  /**
   * Read a `double` field, a 64-bit floating point number.
   */
  double() {
    return this.view.getFloat64((this.pos += 8) - 8, true);
  }
  /**
   * Read a `bytes` field, length-delimited arbitrary data.
   */
  bytes() {
    let len = this.uint32(), start = this.pos;
    this.pos += len;
    this.assertBounds();
    return this.buf.subarray(start, start + len);
  }
  /**
   * Read a `string` field, length-delimited data converted to UTF-8 text. If
   * `strict` is true, throw on invalid UTF-8 instead of substituting U+FFFD.
   */
  string(strict) {
    const len = this.uint32();
    const start = this.pos;
    this.pos += len;
    this.assertBounds();
    const buf = this.buf;
    if (len <= ASCII_MAX_LENGTH) {
      const codes = new Array(len);
      for (let i = 0; i < len; i++) {
        const byte = buf[start + i];
        if (byte > 127) {
          return this.decodeUtf8(buf.subarray(start, this.pos), strict);
        }
        codes[i] = byte;
      }
      return String.fromCharCode.apply(String, codes);
    }
    return this.decodeUtf8(buf.subarray(start, this.pos), strict);
  }
};
function assertInt32(arg) {
  if (typeof arg == "string") {
    arg = Number(arg);
  } else if (typeof arg != "number") {
    throw new Error("invalid int32: " + typeof arg);
  }
  if (!Number.isInteger(arg) || arg > INT32_MAX || arg < INT32_MIN)
    throw new Error("invalid int32: " + arg);
}
function assertUInt32(arg) {
  if (typeof arg == "string") {
    arg = Number(arg);
  } else if (typeof arg != "number") {
    throw new Error("invalid uint32: " + typeof arg);
  }
  if (!Number.isInteger(arg) || arg > UINT32_MAX || arg < 0)
    throw new Error("invalid uint32: " + arg);
}
function assertFloat32(arg) {
  if (typeof arg == "string") {
    const o = arg;
    arg = Number(arg);
    if (Number.isNaN(arg) && o !== "NaN") {
      throw new Error("invalid float32: " + o);
    }
  } else if (typeof arg != "number") {
    throw new Error("invalid float32: " + typeof arg);
  }
  if (!Number.isFinite(Math.fround(arg)) && Number.isFinite(arg)) {
    throw new Error("invalid float32: " + arg);
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/message.js
var NULL_VALUE = 0;
function localMessageMapper(field) {
  if (usesJsonRepresentation(field)) {
    return {
      toMessage: (local) => wktStructToReflect(local),
      toLocal: (message) => wktStructToLocal(message)
    };
  }
  if (field.fieldKind == "message" && !field.oneof && isWrapperDesc(field.message)) {
    const wrapperDesc = field.message;
    const valueLocalName = wrapperDesc.fields[0].localName;
    return {
      toMessage: (local) => {
        const message = create(wrapperDesc);
        if (local !== void 0) {
          message[valueLocalName] = local;
        }
        return message;
      },
      toLocal: (message) => message[valueLocalName]
    };
  }
  const childDesc = field.message;
  return {
    toMessage: (local) => local === void 0 ? create(childDesc) : local,
    toLocal: (message) => message
  };
}
function usesJsonRepresentation(field) {
  return field.message.typeName == "google.protobuf.Struct" && field.parent.typeName != "google.protobuf.Value";
}
function wktStructToReflect(json) {
  const struct = {
    $typeName: "google.protobuf.Struct",
    fields: {}
  };
  if (isObject(json)) {
    for (const k of Object.keys(json)) {
      setOwn(struct.fields, k, wktValueToReflect(json[k]));
    }
  }
  return struct;
}
function wktStructToLocal(val) {
  const json = {};
  for (const k of Object.keys(val.fields)) {
    setOwn(json, k, wktValueToLocal(val.fields[k]));
  }
  return json;
}
function wktValueToLocal(val) {
  switch (val.kind.case) {
    case "structValue":
      return wktStructToLocal(val.kind.value);
    case "listValue":
      return val.kind.value.values.map(wktValueToLocal);
    case "nullValue":
    case void 0:
      return null;
    default:
      return val.kind.value;
  }
}
function wktValueToReflect(json) {
  const value = {
    $typeName: "google.protobuf.Value",
    kind: { case: void 0 }
  };
  switch (typeof json) {
    case "number":
      value.kind = { case: "numberValue", value: json };
      break;
    case "string":
      value.kind = { case: "stringValue", value: json };
      break;
    case "boolean":
      value.kind = { case: "boolValue", value: json };
      break;
    case "object":
      if (json === null) {
        value.kind = { case: "nullValue", value: NULL_VALUE };
      } else if (Array.isArray(json)) {
        const listValue = {
          $typeName: "google.protobuf.ListValue",
          values: []
        };
        if (Array.isArray(json)) {
          for (const e of json) {
            listValue.values.push(wktValueToReflect(e));
          }
        }
        value.kind = {
          case: "listValue",
          value: listValue
        };
      } else {
        value.kind = {
          case: "structValue",
          value: wktStructToReflect(json)
        };
      }
      break;
  }
  return value;
}

// node_modules/@bufbuild/protobuf/dist/esm/wire/base64-encoding.js
var nativeSetFromBase64 = Uint8Array.prototype.setFromBase64;
function base64Decode(base64Str) {
  const len = base64Str.length;
  let size = len - (len + 3 >> 2);
  if ((len & 3) == 0 && base64Str[len - 1] == "=") {
    size -= base64Str[len - 2] == "=" ? 2 : 1;
  }
  const bytes = new Uint8Array(size);
  let written = -1;
  if (nativeSetFromBase64) {
    try {
      const result = nativeSetFromBase64.call(bytes, base64Str);
      if (result.read == len) {
        written = result.written;
      }
    } catch (_a) {
    }
  }
  if (written < 0) {
    written = setFromBase64(bytes, base64Str);
  }
  return written == size ? bytes : bytes.subarray(0, written);
}
function setFromBase64(bytes, base64Str) {
  const table = getDecodeTable();
  let bytePos = 0, groupPos = 0, b, p = 0;
  for (let i = 0; i < base64Str.length; i++) {
    b = table[base64Str.charCodeAt(i)];
    if (b === void 0) {
      switch (base64Str[i]) {
        // @ts-ignore TS7029: Fallthrough case in switch -- ignore instead of expect-error for compiler settings without noFallthroughCasesInSwitch: true
        case "=":
          groupPos = 0;
        // reset state when padding found
        case "\n":
        case "\r":
        case "	":
        case " ":
          continue;
        // skip white-space, and padding
        default:
          throw Error("invalid base64 string");
      }
    }
    switch (groupPos) {
      case 0:
        p = b;
        groupPos = 1;
        break;
      case 1:
        bytes[bytePos++] = p << 2 | (b & 48) >> 4;
        p = b;
        groupPos = 2;
        break;
      case 2:
        bytes[bytePos++] = (p & 15) << 4 | (b & 60) >> 2;
        p = b;
        groupPos = 3;
        break;
      case 3:
        bytes[bytePos++] = (p & 3) << 6 | b;
        groupPos = 0;
        break;
    }
  }
  if (groupPos == 1)
    throw Error("invalid base64 string");
  return bytePos;
}
var nativeToBase64 = Uint8Array.prototype.toBase64;
var encodeTableStd;
var encodeTableUrl;
var decodeTable;
function getEncodeTable(encoding) {
  if (!encodeTableStd) {
    encodeTableStd = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".split("");
    encodeTableUrl = encodeTableStd.slice(0, -2).concat("-", "_");
  }
  return encoding == "url" ? (
    // biome-ignore lint/style/noNonNullAssertion: TS fails to narrow down
    encodeTableUrl
  ) : encodeTableStd;
}
function getDecodeTable() {
  if (!decodeTable) {
    decodeTable = [];
    const encodeTable = getEncodeTable("std");
    for (let i = 0; i < encodeTable.length; i++)
      decodeTable[encodeTable[i].charCodeAt(0)] = i;
    decodeTable["-".charCodeAt(0)] = encodeTable.indexOf("+");
    decodeTable["_".charCodeAt(0)] = encodeTable.indexOf("/");
  }
  return decodeTable;
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/names.js
function protoCamelCase(snakeCase) {
  let capNext = false;
  const b = [];
  for (let i = 0; i < snakeCase.length; i++) {
    let c = snakeCase.charAt(i);
    switch (c) {
      case "_":
        capNext = true;
        break;
      case "0":
      case "1":
      case "2":
      case "3":
      case "4":
      case "5":
      case "6":
      case "7":
      case "8":
      case "9":
        b.push(c);
        capNext = false;
        break;
      default:
        if (capNext) {
          capNext = false;
          c = c.toUpperCase();
        }
        b.push(c);
        break;
    }
  }
  return b.join("");
}
var reservedObjectProperties = /* @__PURE__ */ new Set([
  // names reserved by JavaScript
  "constructor",
  "toString",
  "toJSON",
  "valueOf"
]);
function safeObjectProperty(name) {
  return reservedObjectProperties.has(name) ? name + "$" : name;
}

// node_modules/@bufbuild/protobuf/dist/esm/codegenv2/restore-json-names.js
function restoreJsonNames(message) {
  for (const f of message.field) {
    if (!unsafeIsSetExplicit(f, "jsonName")) {
      f.jsonName = protoCamelCase(f.name);
    }
  }
  message.nestedType.forEach(restoreJsonNames);
}

// node_modules/@bufbuild/protobuf/dist/esm/wire/text-format.js
function parseTextFormatEnumValue(descEnum, value) {
  const enumValue = descEnum.values.find((v) => v.name === value);
  if (!enumValue) {
    throw new Error(`cannot parse ${descEnum} default value: ${value}`);
  }
  return enumValue.number;
}
function parseTextFormatScalarValue(type, value) {
  switch (type) {
    case ScalarType.STRING:
      return value;
    case ScalarType.BYTES: {
      const u = unescapeBytesDefaultValue(value);
      if (u === false) {
        throw new Error(`cannot parse ${ScalarType[type]} default value: ${value}`);
      }
      return u;
    }
    case ScalarType.INT64:
    case ScalarType.SFIXED64:
    case ScalarType.SINT64:
      return protoInt64.parse(value);
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return protoInt64.uParse(value);
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      switch (value) {
        case "inf":
          return Number.POSITIVE_INFINITY;
        case "-inf":
          return Number.NEGATIVE_INFINITY;
        case "nan":
          return Number.NaN;
        default:
          return parseFloat(value);
      }
    case ScalarType.BOOL:
      return value === "true";
    case ScalarType.INT32:
    case ScalarType.UINT32:
    case ScalarType.SINT32:
    case ScalarType.FIXED32:
    case ScalarType.SFIXED32:
      return parseInt(value, 10);
  }
}
function unescapeBytesDefaultValue(str) {
  const b = [];
  const input = {
    tail: str,
    c: "",
    next() {
      if (this.tail.length == 0) {
        return false;
      }
      this.c = this.tail[0];
      this.tail = this.tail.substring(1);
      return true;
    },
    take(n) {
      if (this.tail.length >= n) {
        const r = this.tail.substring(0, n);
        this.tail = this.tail.substring(n);
        return r;
      }
      return false;
    }
  };
  while (input.next()) {
    switch (input.c) {
      case "\\":
        if (input.next()) {
          switch (input.c) {
            case "\\":
              b.push(input.c.charCodeAt(0));
              break;
            case "b":
              b.push(8);
              break;
            case "f":
              b.push(12);
              break;
            case "n":
              b.push(10);
              break;
            case "r":
              b.push(13);
              break;
            case "t":
              b.push(9);
              break;
            case "v":
              b.push(11);
              break;
            case "0":
            case "1":
            case "2":
            case "3":
            case "4":
            case "5":
            case "6":
            case "7": {
              const s = input.c;
              const t = input.take(2);
              if (t === false) {
                return false;
              }
              const n = parseInt(s + t, 8);
              if (Number.isNaN(n)) {
                return false;
              }
              b.push(n);
              break;
            }
            case "x": {
              const s = input.c;
              const t = input.take(2);
              if (t === false) {
                return false;
              }
              const n = parseInt(s + t, 16);
              if (Number.isNaN(n)) {
                return false;
              }
              b.push(n);
              break;
            }
            case "u": {
              const s = input.c;
              const t = input.take(4);
              if (t === false) {
                return false;
              }
              const n = parseInt(s + t, 16);
              if (Number.isNaN(n)) {
                return false;
              }
              const chunk = new Uint8Array(4);
              const view = new DataView(chunk.buffer);
              view.setInt32(0, n, true);
              b.push(chunk[0], chunk[1], chunk[2], chunk[3]);
              break;
            }
            case "U": {
              const s = input.c;
              const t = input.take(8);
              if (t === false) {
                return false;
              }
              const tc = protoInt64.uEnc(s + t);
              const chunk = new Uint8Array(8);
              const view = new DataView(chunk.buffer);
              view.setInt32(0, tc.lo, true);
              view.setInt32(4, tc.hi, true);
              b.push(chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]);
              break;
            }
          }
        }
        break;
      default:
        b.push(input.c.charCodeAt(0));
    }
  }
  return new Uint8Array(b);
}

// node_modules/@bufbuild/protobuf/dist/esm/reflect/nested-types.js
function* nestedTypes(desc) {
  switch (desc.kind) {
    case "file":
      for (const message of desc.messages) {
        yield message;
        yield* nestedTypes(message);
      }
      yield* desc.enums;
      yield* desc.services;
      yield* desc.extensions;
      break;
    case "message":
      for (const message of desc.nestedMessages) {
        yield message;
        yield* nestedTypes(message);
      }
      yield* desc.nestedEnums;
      yield* desc.nestedExtensions;
      break;
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/registry.js
function createEmbeddedFileRegistry(fileDescriptorProto, resolve) {
  return buildFileRegistry([fileDescriptorProto, resolve]);
}
function buildFileRegistry(args, check) {
  const registry = createBaseRegistry();
  if (!args.length) {
    return registry;
  }
  if ("$typeName" in args[0] && args[0].$typeName == "google.protobuf.FileDescriptorSet") {
    for (const file of args[0].file) {
      check === null || check === void 0 ? void 0 : check(file);
      addFile(file, registry);
    }
    return registry;
  }
  if ("$typeName" in args[0]) {
    let recurseDeps = function(file) {
      const deps = [];
      for (const protoFileName of file.dependency) {
        if (registry.getFile(protoFileName) != void 0) {
          continue;
        }
        if (seen.has(protoFileName)) {
          continue;
        }
        const dep = resolve(protoFileName);
        if (!dep) {
          throw new Error(`Unable to resolve ${protoFileName}, imported by ${file.name}`);
        }
        if ("kind" in dep) {
          registry.addFile(dep, false, true);
        } else {
          seen.add(dep.name);
          deps.push(dep);
        }
      }
      return deps.concat(...deps.map(recurseDeps));
    };
    const input = args[0];
    const resolve = args[1];
    const seen = /* @__PURE__ */ new Set();
    for (const file of [input, ...recurseDeps(input)].reverse()) {
      check === null || check === void 0 ? void 0 : check(file);
      addFile(file, registry);
    }
  } else {
    for (const fileReg of args) {
      for (const file of fileReg.files) {
        registry.addFile(file);
      }
    }
  }
  return registry;
}
function createBaseRegistry() {
  const types = /* @__PURE__ */ new Map();
  const extendees = /* @__PURE__ */ new Map();
  const files = /* @__PURE__ */ new Map();
  return {
    kind: "registry",
    types,
    extendees,
    [Symbol.iterator]() {
      return types.values();
    },
    get files() {
      return files.values();
    },
    addFile(file, skipTypes, withDeps) {
      files.set(file.proto.name, file);
      if (!skipTypes) {
        for (const type of nestedTypes(file)) {
          this.add(type);
        }
      }
      if (withDeps) {
        for (const f of file.dependencies) {
          this.addFile(f, skipTypes, withDeps);
        }
      }
    },
    add(desc) {
      if (desc.kind == "extension") {
        let numberToExt = extendees.get(desc.extendee.typeName);
        if (!numberToExt) {
          extendees.set(
            desc.extendee.typeName,
            // biome-ignore lint/suspicious/noAssignInExpressions: no
            numberToExt = /* @__PURE__ */ new Map()
          );
        }
        numberToExt.set(desc.number, desc);
      }
      types.set(desc.typeName, desc);
    },
    get(typeName) {
      return types.get(typeName);
    },
    getFile(fileName) {
      return files.get(fileName);
    },
    getMessage(typeName) {
      const t = types.get(typeName);
      return (t === null || t === void 0 ? void 0 : t.kind) == "message" ? t : void 0;
    },
    getEnum(typeName) {
      const t = types.get(typeName);
      return (t === null || t === void 0 ? void 0 : t.kind) == "enum" ? t : void 0;
    },
    getExtension(typeName) {
      const t = types.get(typeName);
      return (t === null || t === void 0 ? void 0 : t.kind) == "extension" ? t : void 0;
    },
    getExtensionFor(extendee, no) {
      var _a;
      return (_a = extendees.get(extendee.typeName)) === null || _a === void 0 ? void 0 : _a.get(no);
    },
    getService(typeName) {
      const t = types.get(typeName);
      return (t === null || t === void 0 ? void 0 : t.kind) == "service" ? t : void 0;
    }
  };
}
var EDITION_PROTO22 = 998;
var EDITION_PROTO32 = 999;
var EDITION_UNSTABLE = 9999;
var TYPE_STRING = 9;
var TYPE_GROUP = 10;
var TYPE_MESSAGE = 11;
var TYPE_BYTES = 12;
var TYPE_ENUM = 14;
var LABEL_REPEATED = 3;
var LABEL_REQUIRED = 2;
var JS_STRING = 1;
var IDEMPOTENCY_UNKNOWN = 0;
var EXPLICIT = 1;
var IMPLICIT2 = 2;
var LEGACY_REQUIRED = 3;
var PACKED = 1;
var DELIMITED = 2;
var OPEN = 1;
var VERIFY = 2;
var maximumEdition = 1002;
var featureDefaults = {
  // EDITION_PROTO2
  998: {
    fieldPresence: 1,
    // EXPLICIT,
    enumType: 2,
    // CLOSED,
    repeatedFieldEncoding: 2,
    // EXPANDED,
    utf8Validation: 3,
    // NONE,
    messageEncoding: 1,
    // LENGTH_PREFIXED,
    jsonFormat: 2,
    // LEGACY_BEST_EFFORT,
    enforceNamingStyle: 2,
    // STYLE_LEGACY,
    defaultSymbolVisibility: 1,
    // EXPORT_ALL,
    enforceProtoLimits: 1
    // LEGACY_NO_EXPLICIT_LIMITS,
  },
  // EDITION_PROTO3
  999: {
    fieldPresence: 2,
    // IMPLICIT,
    enumType: 1,
    // OPEN,
    repeatedFieldEncoding: 1,
    // PACKED,
    utf8Validation: 2,
    // VERIFY,
    messageEncoding: 1,
    // LENGTH_PREFIXED,
    jsonFormat: 1,
    // ALLOW,
    enforceNamingStyle: 2,
    // STYLE_LEGACY,
    defaultSymbolVisibility: 1,
    // EXPORT_ALL,
    enforceProtoLimits: 1
    // LEGACY_NO_EXPLICIT_LIMITS,
  },
  // EDITION_2023
  1e3: {
    fieldPresence: 1,
    // EXPLICIT,
    enumType: 1,
    // OPEN,
    repeatedFieldEncoding: 1,
    // PACKED,
    utf8Validation: 2,
    // VERIFY,
    messageEncoding: 1,
    // LENGTH_PREFIXED,
    jsonFormat: 1,
    // ALLOW,
    enforceNamingStyle: 2,
    // STYLE_LEGACY,
    defaultSymbolVisibility: 1,
    // EXPORT_ALL,
    enforceProtoLimits: 1
    // LEGACY_NO_EXPLICIT_LIMITS,
  },
  // EDITION_2024
  1001: {
    fieldPresence: 1,
    // EXPLICIT,
    enumType: 1,
    // OPEN,
    repeatedFieldEncoding: 1,
    // PACKED,
    utf8Validation: 2,
    // VERIFY,
    messageEncoding: 1,
    // LENGTH_PREFIXED,
    jsonFormat: 1,
    // ALLOW,
    enforceNamingStyle: 1,
    // STYLE2024,
    defaultSymbolVisibility: 2,
    // EXPORT_TOP_LEVEL,
    enforceProtoLimits: 1
    // LEGACY_NO_EXPLICIT_LIMITS,
  },
  // EDITION_2026
  1002: {
    fieldPresence: 1,
    // EXPLICIT,
    enumType: 1,
    // OPEN,
    repeatedFieldEncoding: 1,
    // PACKED,
    utf8Validation: 2,
    // VERIFY,
    messageEncoding: 1,
    // LENGTH_PREFIXED,
    jsonFormat: 1,
    // ALLOW,
    enforceNamingStyle: 3,
    // STYLE2026,
    defaultSymbolVisibility: 4,
    // STRICT,
    enforceProtoLimits: 2
    // PROTO_LIMITS2026,
  }
};
function addFile(proto, reg) {
  var _a, _b;
  const file = {
    kind: "file",
    proto,
    deprecated: (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.deprecated) !== null && _b !== void 0 ? _b : false,
    edition: getFileEdition(proto),
    name: proto.name.replace(/\.proto$/, ""),
    dependencies: findFileDependencies(proto, reg),
    enums: [],
    messages: [],
    extensions: [],
    services: [],
    toString() {
      return `file ${proto.name}`;
    }
  };
  const mapEntriesStore = /* @__PURE__ */ new Map();
  const mapEntries = {
    get(typeName) {
      return mapEntriesStore.get(typeName);
    },
    add(desc) {
      var _a2;
      assert(((_a2 = desc.proto.options) === null || _a2 === void 0 ? void 0 : _a2.mapEntry) === true);
      mapEntriesStore.set(desc.typeName, desc);
    }
  };
  for (const enumProto of proto.enumType) {
    addEnum(enumProto, file, void 0, reg);
  }
  for (const messageProto of proto.messageType) {
    addMessage(messageProto, file, void 0, reg, mapEntries);
  }
  for (const serviceProto of proto.service) {
    addService(serviceProto, file, reg);
  }
  addExtensions(file, reg);
  for (const mapEntry of mapEntriesStore.values()) {
    addFields(mapEntry, reg, mapEntries);
  }
  for (const message of file.messages) {
    addFields(message, reg, mapEntries);
    addExtensions(message, reg);
  }
  reg.addFile(file, true);
}
function addExtensions(desc, reg) {
  switch (desc.kind) {
    case "file":
      for (const proto of desc.proto.extension) {
        const ext = newField(proto, desc, reg);
        desc.extensions.push(ext);
        reg.add(ext);
      }
      break;
    case "message":
      for (const proto of desc.proto.extension) {
        const ext = newField(proto, desc, reg);
        desc.nestedExtensions.push(ext);
        reg.add(ext);
      }
      for (const message of desc.nestedMessages) {
        addExtensions(message, reg);
      }
      break;
  }
}
function addFields(message, reg, mapEntries) {
  const allOneofs = message.proto.oneofDecl.map((proto) => newOneof(proto, message));
  const oneofsSeen = /* @__PURE__ */ new Set();
  for (const proto of message.proto.field) {
    const oneof = findOneof(proto, allOneofs);
    const field = newField(proto, message, reg, oneof, mapEntries);
    message.fields.push(field);
    message.field[field.localName] = field;
    if (oneof === void 0) {
      message.members.push(field);
    } else {
      oneof.fields.push(field);
      if (!oneofsSeen.has(oneof)) {
        oneofsSeen.add(oneof);
        message.members.push(oneof);
      }
    }
  }
  for (const oneof of allOneofs.filter((o) => oneofsSeen.has(o))) {
    message.oneofs.push(oneof);
  }
  for (const child of message.nestedMessages) {
    addFields(child, reg, mapEntries);
  }
}
function addEnum(proto, file, parent, reg) {
  var _a, _b, _c, _d, _e, _f, _g;
  var _h, _j;
  const sharedPrefix = findEnumSharedPrefix(proto.name, proto.value);
  const desc = {
    kind: "enum",
    proto,
    deprecated: (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.deprecated) !== null && _b !== void 0 ? _b : false,
    file,
    parent,
    open: true,
    name: proto.name,
    typeName: makeTypeName(proto, parent, file),
    value: {},
    values: [],
    sharedPrefix,
    toString() {
      return `enum ${this.typeName}`;
    }
  };
  desc.open = isEnumOpen(desc);
  reg.add(desc);
  for (const p of proto.value) {
    const name = p.name;
    const value = {
      kind: "enum_value",
      proto: p,
      deprecated: (_d = (_c = p.options) === null || _c === void 0 ? void 0 : _c.deprecated) !== null && _d !== void 0 ? _d : false,
      parent: desc,
      name,
      localName: safeObjectProperty(sharedPrefix == void 0 ? name : name.substring(sharedPrefix.length)),
      number: p.number,
      jsonName: (_e = findEnumValueJsonName(p)) !== null && _e !== void 0 ? _e : name,
      toString() {
        return `enum value ${desc.typeName}.${name}`;
      }
    };
    desc.values.push(value);
    (_f = (_h = desc.value)[_j = p.number]) !== null && _f !== void 0 ? _f : _h[_j] = value;
  }
  ((_g = parent === null || parent === void 0 ? void 0 : parent.nestedEnums) !== null && _g !== void 0 ? _g : file.enums).push(desc);
}
function addMessage(proto, file, parent, reg, mapEntries) {
  var _a, _b, _c, _d;
  const desc = {
    kind: "message",
    proto,
    deprecated: (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.deprecated) !== null && _b !== void 0 ? _b : false,
    file,
    parent,
    name: proto.name,
    typeName: makeTypeName(proto, parent, file),
    fields: [],
    field: {},
    oneofs: [],
    members: [],
    nestedEnums: [],
    nestedMessages: [],
    nestedExtensions: [],
    toString() {
      return `message ${this.typeName}`;
    }
  };
  if (((_c = proto.options) === null || _c === void 0 ? void 0 : _c.mapEntry) === true) {
    mapEntries.add(desc);
  } else {
    ((_d = parent === null || parent === void 0 ? void 0 : parent.nestedMessages) !== null && _d !== void 0 ? _d : file.messages).push(desc);
    reg.add(desc);
  }
  for (const enumProto of proto.enumType) {
    addEnum(enumProto, file, desc, reg);
  }
  for (const messageProto of proto.nestedType) {
    addMessage(messageProto, file, desc, reg, mapEntries);
  }
}
function addService(proto, file, reg) {
  var _a, _b;
  const desc = {
    kind: "service",
    proto,
    deprecated: (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.deprecated) !== null && _b !== void 0 ? _b : false,
    file,
    name: proto.name,
    typeName: makeTypeName(proto, void 0, file),
    methods: [],
    method: {},
    toString() {
      return `service ${this.typeName}`;
    }
  };
  file.services.push(desc);
  reg.add(desc);
  for (const methodProto of proto.method) {
    const method = newMethod(methodProto, desc, reg);
    desc.methods.push(method);
    desc.method[method.localName] = method;
  }
}
function newMethod(proto, parent, reg) {
  var _a, _b, _c, _d;
  let methodKind;
  if (proto.clientStreaming && proto.serverStreaming) {
    methodKind = "bidi_streaming";
  } else if (proto.clientStreaming) {
    methodKind = "client_streaming";
  } else if (proto.serverStreaming) {
    methodKind = "server_streaming";
  } else {
    methodKind = "unary";
  }
  const input = reg.getMessage(trimLeadingDot(proto.inputType));
  const output = reg.getMessage(trimLeadingDot(proto.outputType));
  assert(input, `invalid MethodDescriptorProto: input_type ${proto.inputType} not found`);
  assert(output, `invalid MethodDescriptorProto: output_type ${proto.inputType} not found`);
  const name = proto.name;
  return {
    kind: "rpc",
    proto,
    deprecated: (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.deprecated) !== null && _b !== void 0 ? _b : false,
    parent,
    name,
    localName: safeObjectProperty(name.length ? safeObjectProperty(name[0].toLowerCase() + name.substring(1)) : name),
    methodKind,
    input,
    output,
    idempotency: (_d = (_c = proto.options) === null || _c === void 0 ? void 0 : _c.idempotencyLevel) !== null && _d !== void 0 ? _d : IDEMPOTENCY_UNKNOWN,
    toString() {
      return `rpc ${parent.typeName}.${name}`;
    }
  };
}
function newOneof(proto, parent) {
  return {
    kind: "oneof",
    proto,
    deprecated: false,
    parent,
    fields: [],
    name: proto.name,
    localName: safeObjectProperty(protoCamelCase(proto.name)),
    toString() {
      return `oneof ${parent.typeName}.${this.name}`;
    }
  };
}
function newField(proto, parentOrFile, reg, oneof, mapEntries) {
  var _a, _b, _c;
  const isExtension = mapEntries === void 0;
  const field = {
    kind: "field",
    proto,
    deprecated: (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.deprecated) !== null && _b !== void 0 ? _b : false,
    name: proto.name,
    number: proto.number,
    scalar: void 0,
    message: void 0,
    enum: void 0,
    presence: getFieldPresence(proto, oneof, isExtension, parentOrFile),
    utf8Validation: isUtf8Validated(proto, parentOrFile),
    listKind: void 0,
    mapKind: void 0,
    mapKey: void 0,
    delimitedEncoding: void 0,
    packed: void 0,
    longAsString: false,
    getDefaultValue: void 0
  };
  let toStr;
  if (isExtension) {
    const file = parentOrFile.kind == "file" ? parentOrFile : parentOrFile.file;
    const parent = parentOrFile.kind == "file" ? void 0 : parentOrFile;
    const typeName = makeTypeName(proto, parent, file);
    field.kind = "extension";
    field.file = file;
    field.parent = parent;
    field.oneof = void 0;
    field.typeName = typeName;
    field.jsonName = `[${typeName}]`;
    toStr = () => `extension ${typeName}`;
    const extendee = reg.getMessage(trimLeadingDot(proto.extendee));
    assert(extendee, `invalid FieldDescriptorProto: extendee ${proto.extendee} not found`);
    field.extendee = extendee;
  } else {
    const parent = parentOrFile;
    assert(parent.kind == "message");
    field.parent = parent;
    field.oneof = oneof;
    field.localName = oneof ? protoCamelCase(proto.name) : safeObjectProperty(protoCamelCase(proto.name));
    field.jsonName = proto.jsonName;
    toStr = () => `field ${parent.typeName}.${proto.name}`;
  }
  Object.defineProperty(field, "toString", {
    value: toStr,
    writable: true,
    enumerable: true,
    configurable: true
  });
  const label = proto.label;
  const type = proto.type;
  const jstype = (_c = proto.options) === null || _c === void 0 ? void 0 : _c.jstype;
  if (label === LABEL_REPEATED) {
    const mapEntry = type == TYPE_MESSAGE ? mapEntries === null || mapEntries === void 0 ? void 0 : mapEntries.get(trimLeadingDot(proto.typeName)) : void 0;
    if (mapEntry) {
      field.fieldKind = "map";
      const { key, value } = findMapEntryFields(mapEntry);
      field.mapKey = key.scalar;
      field.mapKind = value.fieldKind;
      field.message = value.message;
      field.delimitedEncoding = false;
      field.enum = value.enum;
      field.scalar = value.scalar;
      return field;
    }
    field.fieldKind = "list";
    switch (type) {
      case TYPE_MESSAGE:
      case TYPE_GROUP:
        field.listKind = "message";
        field.message = reg.getMessage(trimLeadingDot(proto.typeName));
        assert(field.message);
        field.delimitedEncoding = isDelimitedEncoding(proto, parentOrFile);
        break;
      case TYPE_ENUM:
        field.listKind = "enum";
        field.enum = reg.getEnum(trimLeadingDot(proto.typeName));
        assert(field.enum);
        break;
      default:
        field.listKind = "scalar";
        field.scalar = type;
        field.longAsString = jstype == JS_STRING;
        break;
    }
    field.packed = isPackedField(proto, parentOrFile);
    return field;
  }
  switch (type) {
    case TYPE_MESSAGE:
    case TYPE_GROUP:
      field.fieldKind = "message";
      field.message = reg.getMessage(trimLeadingDot(proto.typeName));
      assert(field.message, `invalid FieldDescriptorProto: type_name ${proto.typeName} not found`);
      field.delimitedEncoding = isDelimitedEncoding(proto, parentOrFile);
      field.getDefaultValue = () => void 0;
      break;
    case TYPE_ENUM: {
      const enumeration = reg.getEnum(trimLeadingDot(proto.typeName));
      assert(enumeration !== void 0, `invalid FieldDescriptorProto: type_name ${proto.typeName} not found`);
      field.fieldKind = "enum";
      field.enum = reg.getEnum(trimLeadingDot(proto.typeName));
      field.getDefaultValue = () => {
        return unsafeIsSetExplicit(proto, "defaultValue") ? parseTextFormatEnumValue(enumeration, proto.defaultValue) : void 0;
      };
      break;
    }
    default: {
      field.fieldKind = "scalar";
      field.scalar = type;
      field.longAsString = jstype == JS_STRING;
      field.getDefaultValue = () => {
        return unsafeIsSetExplicit(proto, "defaultValue") ? parseTextFormatScalarValue(type, proto.defaultValue) : void 0;
      };
      break;
    }
  }
  return field;
}
function getFileEdition(proto) {
  switch (proto.syntax) {
    case "":
    case "proto2":
      return EDITION_PROTO22;
    case "proto3":
      return EDITION_PROTO32;
    case "editions":
      if (proto.edition === EDITION_UNSTABLE) {
        return maximumEdition;
      }
      if (proto.edition in featureDefaults) {
        return proto.edition;
      }
      throw new Error(`${proto.name}: unsupported edition`);
    default:
      throw new Error(`${proto.name}: unsupported syntax "${proto.syntax}"`);
  }
}
function findFileDependencies(proto, reg) {
  return proto.dependency.map((wantName) => {
    const dep = reg.getFile(wantName);
    if (!dep) {
      throw new Error(`Cannot find ${wantName}, imported by ${proto.name}`);
    }
    return dep;
  });
}
function findEnumSharedPrefix(enumName, values) {
  const prefix = camelToSnakeCase(enumName) + "_";
  for (const value of values) {
    if (!value.name.toLowerCase().startsWith(prefix)) {
      return void 0;
    }
    const shortName = value.name.substring(prefix.length);
    if (shortName.length == 0) {
      return void 0;
    }
    if (/^\d/.test(shortName)) {
      return void 0;
    }
  }
  return prefix;
}
function findEnumValueJsonName(proto) {
  var _a, _b;
  const extensionNumber = 998;
  const fieldNumber = 1;
  let jsonName;
  for (const uf of (_b = (_a = proto.options) === null || _a === void 0 ? void 0 : _a.$unknown) !== null && _b !== void 0 ? _b : []) {
    if (uf.no !== extensionNumber || uf.wireType !== WireType.LengthDelimited) {
      continue;
    }
    const reader = new BinaryReader(new BinaryReader(uf.data).bytes());
    while (reader.pos < reader.len) {
      const [no, wireType] = reader.tag();
      if (no === fieldNumber && wireType === WireType.LengthDelimited) {
        jsonName = reader.string();
      } else {
        reader.skip(wireType, no);
      }
    }
  }
  return jsonName;
}
function camelToSnakeCase(camel) {
  return (camel.substring(0, 1) + camel.substring(1).replace(/[A-Z]/g, (c) => "_" + c)).toLowerCase();
}
function makeTypeName(proto, parent, file) {
  let typeName;
  if (parent) {
    typeName = `${parent.typeName}.${proto.name}`;
  } else if (file.proto.package.length > 0) {
    typeName = `${file.proto.package}.${proto.name}`;
  } else {
    typeName = `${proto.name}`;
  }
  return typeName;
}
function trimLeadingDot(typeName) {
  return typeName.startsWith(".") ? typeName.substring(1) : typeName;
}
function findOneof(proto, allOneofs) {
  if (!unsafeIsSetExplicit(proto, "oneofIndex")) {
    return void 0;
  }
  if (proto.proto3Optional) {
    return void 0;
  }
  const oneof = allOneofs[proto.oneofIndex];
  assert(oneof, `invalid FieldDescriptorProto: oneof #${proto.oneofIndex} for field #${proto.number} not found`);
  return oneof;
}
function getFieldPresence(proto, oneof, isExtension, parent) {
  if (proto.label == LABEL_REQUIRED) {
    return LEGACY_REQUIRED;
  }
  if (proto.label == LABEL_REPEATED) {
    return IMPLICIT2;
  }
  if (!!oneof || proto.proto3Optional) {
    return EXPLICIT;
  }
  if (isExtension) {
    return EXPLICIT;
  }
  const resolved = resolveFeature("fieldPresence", { proto, parent });
  if (resolved == IMPLICIT2 && (proto.type == TYPE_MESSAGE || proto.type == TYPE_GROUP)) {
    return EXPLICIT;
  }
  return resolved;
}
function isPackedField(proto, parent) {
  if (proto.label != LABEL_REPEATED) {
    return false;
  }
  switch (proto.type) {
    case TYPE_STRING:
    case TYPE_BYTES:
    case TYPE_GROUP:
    case TYPE_MESSAGE:
      return false;
  }
  const o = proto.options;
  if (o && unsafeIsSetExplicit(o, "packed")) {
    return o.packed;
  }
  return PACKED == resolveFeature("repeatedFieldEncoding", {
    proto,
    parent
  });
}
function findMapEntryFields(mapEntry) {
  const key = mapEntry.fields.find((f) => f.number === 1);
  const value = mapEntry.fields.find((f) => f.number === 2);
  assert(key && key.fieldKind == "scalar" && key.scalar != ScalarType.BYTES && key.scalar != ScalarType.FLOAT && key.scalar != ScalarType.DOUBLE && value && value.fieldKind != "list" && value.fieldKind != "map");
  return { key, value };
}
function isEnumOpen(desc) {
  var _a;
  return OPEN == resolveFeature("enumType", {
    proto: desc.proto,
    parent: (_a = desc.parent) !== null && _a !== void 0 ? _a : desc.file
  });
}
function isDelimitedEncoding(proto, parent) {
  if (proto.type == TYPE_GROUP) {
    return true;
  }
  return DELIMITED == resolveFeature("messageEncoding", {
    proto,
    parent
  });
}
function isUtf8Validated(proto, parent) {
  return VERIFY == resolveFeature("utf8Validation", {
    proto,
    parent
  });
}
function resolveFeature(name, ref) {
  var _a, _b;
  const featureSet = (_a = ref.proto.options) === null || _a === void 0 ? void 0 : _a.features;
  if (featureSet) {
    const val = featureSet[name];
    if (val != 0) {
      return val;
    }
  }
  if ("kind" in ref) {
    if (ref.kind == "message") {
      return resolveFeature(name, (_b = ref.parent) !== null && _b !== void 0 ? _b : ref.file);
    }
    const editionDefaults = featureDefaults[ref.edition];
    if (!editionDefaults) {
      throw new Error(`feature default for edition ${ref.edition} not found`);
    }
    return editionDefaults[name];
  }
  return resolveFeature(name, ref.parent);
}
function assert(condition, msg) {
  if (!condition) {
    throw new Error(msg);
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/codegenv2/boot.js
function boot(boot2) {
  const root = bootFileDescriptorProto(boot2);
  root.messageType.forEach(restoreJsonNames);
  const reg = createEmbeddedFileRegistry(root, () => void 0);
  return reg.getFile(root.name);
}
function bootFileDescriptorProto(init) {
  const proto = /* @__PURE__ */ Object.create({
    syntax: "",
    edition: 0
  });
  return Object.assign(proto, Object.assign(Object.assign({ $typeName: "google.protobuf.FileDescriptorProto", dependency: [], publicDependency: [], weakDependency: [], optionDependency: [], service: [], extension: [] }, init), { messageType: init.messageType.map(bootDescriptorProto), enumType: init.enumType.map(bootEnumDescriptorProto) }));
}
function bootDescriptorProto(init) {
  var _a, _b, _c, _d, _e, _f, _g, _h;
  const proto = /* @__PURE__ */ Object.create({
    visibility: 0
  });
  return Object.assign(proto, {
    $typeName: "google.protobuf.DescriptorProto",
    name: init.name,
    field: (_b = (_a = init.field) === null || _a === void 0 ? void 0 : _a.map(bootFieldDescriptorProto)) !== null && _b !== void 0 ? _b : [],
    extension: [],
    nestedType: (_d = (_c = init.nestedType) === null || _c === void 0 ? void 0 : _c.map(bootDescriptorProto)) !== null && _d !== void 0 ? _d : [],
    enumType: (_f = (_e = init.enumType) === null || _e === void 0 ? void 0 : _e.map(bootEnumDescriptorProto)) !== null && _f !== void 0 ? _f : [],
    extensionRange: (_h = (_g = init.extensionRange) === null || _g === void 0 ? void 0 : _g.map((e) => Object.assign({ $typeName: "google.protobuf.DescriptorProto.ExtensionRange" }, e))) !== null && _h !== void 0 ? _h : [],
    oneofDecl: [],
    reservedRange: [],
    reservedName: []
  });
}
function bootFieldDescriptorProto(init) {
  const proto = /* @__PURE__ */ Object.create({
    label: 1,
    typeName: "",
    extendee: "",
    defaultValue: "",
    oneofIndex: 0,
    jsonName: "",
    proto3Optional: false
  });
  return Object.assign(proto, Object.assign(Object.assign({ $typeName: "google.protobuf.FieldDescriptorProto" }, init), { options: init.options ? bootFieldOptions(init.options) : void 0 }));
}
function bootFieldOptions(init) {
  var _a, _b, _c;
  const proto = /* @__PURE__ */ Object.create({
    ctype: 0,
    packed: false,
    jstype: 0,
    lazy: false,
    unverifiedLazy: false,
    deprecated: false,
    weak: false,
    debugRedact: false,
    retention: 0
  });
  return Object.assign(proto, Object.assign(Object.assign({ $typeName: "google.protobuf.FieldOptions" }, init), { targets: (_a = init.targets) !== null && _a !== void 0 ? _a : [], editionDefaults: (_c = (_b = init.editionDefaults) === null || _b === void 0 ? void 0 : _b.map((e) => Object.assign({ $typeName: "google.protobuf.FieldOptions.EditionDefault" }, e))) !== null && _c !== void 0 ? _c : [], uninterpretedOption: [] }));
}
function bootEnumDescriptorProto(init) {
  const proto = /* @__PURE__ */ Object.create({
    visibility: 0
  });
  return Object.assign(proto, {
    $typeName: "google.protobuf.EnumDescriptorProto",
    name: init.name,
    reservedName: [],
    reservedRange: [],
    value: init.value.map((e) => Object.assign({ $typeName: "google.protobuf.EnumValueDescriptorProto" }, e))
  });
}

// node_modules/@bufbuild/protobuf/dist/esm/codegenv2/message.js
function messageDesc(file, path, ...paths) {
  return paths.reduce((acc, cur) => acc.nestedMessages[cur], file.messages[path]);
}

// node_modules/@bufbuild/protobuf/dist/esm/wkt/google/protobuf/descriptor_pb.js
var file_google_protobuf_descriptor = /* @__PURE__ */ boot({ "name": "google/protobuf/descriptor.proto", "package": "google.protobuf", "messageType": [{ "name": "FileDescriptorSet", "field": [{ "name": "file", "number": 1, "type": 11, "label": 3, "typeName": ".google.protobuf.FileDescriptorProto" }], "extensionRange": [{ "start": 536e6, "end": 536000001 }] }, { "name": "FileDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "package", "number": 2, "type": 9, "label": 1 }, { "name": "dependency", "number": 3, "type": 9, "label": 3 }, { "name": "public_dependency", "number": 10, "type": 5, "label": 3 }, { "name": "weak_dependency", "number": 11, "type": 5, "label": 3 }, { "name": "option_dependency", "number": 15, "type": 9, "label": 3 }, { "name": "message_type", "number": 4, "type": 11, "label": 3, "typeName": ".google.protobuf.DescriptorProto" }, { "name": "enum_type", "number": 5, "type": 11, "label": 3, "typeName": ".google.protobuf.EnumDescriptorProto" }, { "name": "service", "number": 6, "type": 11, "label": 3, "typeName": ".google.protobuf.ServiceDescriptorProto" }, { "name": "extension", "number": 7, "type": 11, "label": 3, "typeName": ".google.protobuf.FieldDescriptorProto" }, { "name": "options", "number": 8, "type": 11, "label": 1, "typeName": ".google.protobuf.FileOptions" }, { "name": "source_code_info", "number": 9, "type": 11, "label": 1, "typeName": ".google.protobuf.SourceCodeInfo" }, { "name": "syntax", "number": 12, "type": 9, "label": 1 }, { "name": "edition", "number": 14, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }] }, { "name": "DescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "field", "number": 2, "type": 11, "label": 3, "typeName": ".google.protobuf.FieldDescriptorProto" }, { "name": "extension", "number": 6, "type": 11, "label": 3, "typeName": ".google.protobuf.FieldDescriptorProto" }, { "name": "nested_type", "number": 3, "type": 11, "label": 3, "typeName": ".google.protobuf.DescriptorProto" }, { "name": "enum_type", "number": 4, "type": 11, "label": 3, "typeName": ".google.protobuf.EnumDescriptorProto" }, { "name": "extension_range", "number": 5, "type": 11, "label": 3, "typeName": ".google.protobuf.DescriptorProto.ExtensionRange" }, { "name": "oneof_decl", "number": 8, "type": 11, "label": 3, "typeName": ".google.protobuf.OneofDescriptorProto" }, { "name": "options", "number": 7, "type": 11, "label": 1, "typeName": ".google.protobuf.MessageOptions" }, { "name": "reserved_range", "number": 9, "type": 11, "label": 3, "typeName": ".google.protobuf.DescriptorProto.ReservedRange" }, { "name": "reserved_name", "number": 10, "type": 9, "label": 3 }, { "name": "visibility", "number": 11, "type": 14, "label": 1, "typeName": ".google.protobuf.SymbolVisibility" }], "nestedType": [{ "name": "ExtensionRange", "field": [{ "name": "start", "number": 1, "type": 5, "label": 1 }, { "name": "end", "number": 2, "type": 5, "label": 1 }, { "name": "options", "number": 3, "type": 11, "label": 1, "typeName": ".google.protobuf.ExtensionRangeOptions" }] }, { "name": "ReservedRange", "field": [{ "name": "start", "number": 1, "type": 5, "label": 1 }, { "name": "end", "number": 2, "type": 5, "label": 1 }] }] }, { "name": "ExtensionRangeOptions", "field": [{ "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }, { "name": "declaration", "number": 2, "type": 11, "label": 3, "typeName": ".google.protobuf.ExtensionRangeOptions.Declaration", "options": { "retention": 2 } }, { "name": "features", "number": 50, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "verification", "number": 3, "type": 14, "label": 1, "typeName": ".google.protobuf.ExtensionRangeOptions.VerificationState", "defaultValue": "UNVERIFIED", "options": { "retention": 2 } }], "nestedType": [{ "name": "Declaration", "field": [{ "name": "number", "number": 1, "type": 5, "label": 1 }, { "name": "full_name", "number": 2, "type": 9, "label": 1 }, { "name": "type", "number": 3, "type": 9, "label": 1 }, { "name": "reserved", "number": 5, "type": 8, "label": 1 }, { "name": "repeated", "number": 6, "type": 8, "label": 1 }] }], "enumType": [{ "name": "VerificationState", "value": [{ "name": "DECLARATION", "number": 0 }, { "name": "UNVERIFIED", "number": 1 }] }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "FieldDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "number", "number": 3, "type": 5, "label": 1 }, { "name": "label", "number": 4, "type": 14, "label": 1, "typeName": ".google.protobuf.FieldDescriptorProto.Label" }, { "name": "type", "number": 5, "type": 14, "label": 1, "typeName": ".google.protobuf.FieldDescriptorProto.Type" }, { "name": "type_name", "number": 6, "type": 9, "label": 1 }, { "name": "extendee", "number": 2, "type": 9, "label": 1 }, { "name": "default_value", "number": 7, "type": 9, "label": 1 }, { "name": "oneof_index", "number": 9, "type": 5, "label": 1 }, { "name": "json_name", "number": 10, "type": 9, "label": 1 }, { "name": "options", "number": 8, "type": 11, "label": 1, "typeName": ".google.protobuf.FieldOptions" }, { "name": "proto3_optional", "number": 17, "type": 8, "label": 1 }], "enumType": [{ "name": "Type", "value": [{ "name": "TYPE_DOUBLE", "number": 1 }, { "name": "TYPE_FLOAT", "number": 2 }, { "name": "TYPE_INT64", "number": 3 }, { "name": "TYPE_UINT64", "number": 4 }, { "name": "TYPE_INT32", "number": 5 }, { "name": "TYPE_FIXED64", "number": 6 }, { "name": "TYPE_FIXED32", "number": 7 }, { "name": "TYPE_BOOL", "number": 8 }, { "name": "TYPE_STRING", "number": 9 }, { "name": "TYPE_GROUP", "number": 10 }, { "name": "TYPE_MESSAGE", "number": 11 }, { "name": "TYPE_BYTES", "number": 12 }, { "name": "TYPE_UINT32", "number": 13 }, { "name": "TYPE_ENUM", "number": 14 }, { "name": "TYPE_SFIXED32", "number": 15 }, { "name": "TYPE_SFIXED64", "number": 16 }, { "name": "TYPE_SINT32", "number": 17 }, { "name": "TYPE_SINT64", "number": 18 }] }, { "name": "Label", "value": [{ "name": "LABEL_OPTIONAL", "number": 1 }, { "name": "LABEL_REPEATED", "number": 3 }, { "name": "LABEL_REQUIRED", "number": 2 }] }] }, { "name": "OneofDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "options", "number": 2, "type": 11, "label": 1, "typeName": ".google.protobuf.OneofOptions" }] }, { "name": "EnumDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "value", "number": 2, "type": 11, "label": 3, "typeName": ".google.protobuf.EnumValueDescriptorProto" }, { "name": "options", "number": 3, "type": 11, "label": 1, "typeName": ".google.protobuf.EnumOptions" }, { "name": "reserved_range", "number": 4, "type": 11, "label": 3, "typeName": ".google.protobuf.EnumDescriptorProto.EnumReservedRange" }, { "name": "reserved_name", "number": 5, "type": 9, "label": 3 }, { "name": "visibility", "number": 6, "type": 14, "label": 1, "typeName": ".google.protobuf.SymbolVisibility" }], "nestedType": [{ "name": "EnumReservedRange", "field": [{ "name": "start", "number": 1, "type": 5, "label": 1 }, { "name": "end", "number": 2, "type": 5, "label": 1 }] }] }, { "name": "EnumValueDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "number", "number": 2, "type": 5, "label": 1 }, { "name": "options", "number": 3, "type": 11, "label": 1, "typeName": ".google.protobuf.EnumValueOptions" }] }, { "name": "ServiceDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "method", "number": 2, "type": 11, "label": 3, "typeName": ".google.protobuf.MethodDescriptorProto" }, { "name": "options", "number": 3, "type": 11, "label": 1, "typeName": ".google.protobuf.ServiceOptions" }] }, { "name": "MethodDescriptorProto", "field": [{ "name": "name", "number": 1, "type": 9, "label": 1 }, { "name": "input_type", "number": 2, "type": 9, "label": 1 }, { "name": "output_type", "number": 3, "type": 9, "label": 1 }, { "name": "options", "number": 4, "type": 11, "label": 1, "typeName": ".google.protobuf.MethodOptions" }, { "name": "client_streaming", "number": 5, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "server_streaming", "number": 6, "type": 8, "label": 1, "defaultValue": "false" }] }, { "name": "FileOptions", "field": [{ "name": "java_package", "number": 1, "type": 9, "label": 1 }, { "name": "java_outer_classname", "number": 8, "type": 9, "label": 1 }, { "name": "java_multiple_files", "number": 10, "type": 8, "label": 1, "defaultValue": "false", "options": {} }, { "name": "java_generate_equals_and_hash", "number": 20, "type": 8, "label": 1, "options": { "deprecated": true } }, { "name": "java_string_check_utf8", "number": 27, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "optimize_for", "number": 9, "type": 14, "label": 1, "typeName": ".google.protobuf.FileOptions.OptimizeMode", "defaultValue": "SPEED" }, { "name": "go_package", "number": 11, "type": 9, "label": 1 }, { "name": "cc_generic_services", "number": 16, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "java_generic_services", "number": 17, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "py_generic_services", "number": 18, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "deprecated", "number": 23, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "cc_enable_arenas", "number": 31, "type": 8, "label": 1, "defaultValue": "true", "options": {} }, { "name": "objc_class_prefix", "number": 36, "type": 9, "label": 1 }, { "name": "csharp_namespace", "number": 37, "type": 9, "label": 1 }, { "name": "swift_prefix", "number": 39, "type": 9, "label": 1 }, { "name": "php_class_prefix", "number": 40, "type": 9, "label": 1 }, { "name": "php_namespace", "number": 41, "type": 9, "label": 1 }, { "name": "php_metadata_namespace", "number": 44, "type": 9, "label": 1 }, { "name": "ruby_package", "number": 45, "type": 9, "label": 1 }, { "name": "features", "number": 50, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "enumType": [{ "name": "OptimizeMode", "value": [{ "name": "SPEED", "number": 1 }, { "name": "CODE_SIZE", "number": 2 }, { "name": "LITE_RUNTIME", "number": 3 }] }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "MessageOptions", "field": [{ "name": "message_set_wire_format", "number": 1, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "no_standard_descriptor_accessor", "number": 2, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "deprecated", "number": 3, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "map_entry", "number": 7, "type": 8, "label": 1 }, { "name": "deprecated_legacy_json_field_conflicts", "number": 11, "type": 8, "label": 1, "options": { "deprecated": true } }, { "name": "features", "number": 12, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "FieldOptions", "field": [{ "name": "ctype", "number": 1, "type": 14, "label": 1, "typeName": ".google.protobuf.FieldOptions.CType", "defaultValue": "STRING" }, { "name": "packed", "number": 2, "type": 8, "label": 1 }, { "name": "jstype", "number": 6, "type": 14, "label": 1, "typeName": ".google.protobuf.FieldOptions.JSType", "defaultValue": "JS_NORMAL" }, { "name": "lazy", "number": 5, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "unverified_lazy", "number": 15, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "deprecated", "number": 3, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "weak", "number": 10, "type": 8, "label": 1, "defaultValue": "false", "options": { "deprecated": true } }, { "name": "debug_redact", "number": 16, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "retention", "number": 17, "type": 14, "label": 1, "typeName": ".google.protobuf.FieldOptions.OptionRetention" }, { "name": "targets", "number": 19, "type": 14, "label": 3, "typeName": ".google.protobuf.FieldOptions.OptionTargetType" }, { "name": "edition_defaults", "number": 20, "type": 11, "label": 3, "typeName": ".google.protobuf.FieldOptions.EditionDefault" }, { "name": "features", "number": 21, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "feature_support", "number": 22, "type": 11, "label": 1, "typeName": ".google.protobuf.FieldOptions.FeatureSupport" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "nestedType": [{ "name": "EditionDefault", "field": [{ "name": "edition", "number": 3, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }, { "name": "value", "number": 2, "type": 9, "label": 1 }] }, { "name": "FeatureSupport", "field": [{ "name": "edition_introduced", "number": 1, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }, { "name": "edition_deprecated", "number": 2, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }, { "name": "deprecation_warning", "number": 3, "type": 9, "label": 1 }, { "name": "edition_removed", "number": 4, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }, { "name": "removal_error", "number": 5, "type": 9, "label": 1 }] }], "enumType": [{ "name": "CType", "value": [{ "name": "STRING", "number": 0 }, { "name": "CORD", "number": 1 }, { "name": "STRING_PIECE", "number": 2 }] }, { "name": "JSType", "value": [{ "name": "JS_NORMAL", "number": 0 }, { "name": "JS_STRING", "number": 1 }, { "name": "JS_NUMBER", "number": 2 }] }, { "name": "OptionRetention", "value": [{ "name": "RETENTION_UNKNOWN", "number": 0 }, { "name": "RETENTION_RUNTIME", "number": 1 }, { "name": "RETENTION_SOURCE", "number": 2 }] }, { "name": "OptionTargetType", "value": [{ "name": "TARGET_TYPE_UNKNOWN", "number": 0 }, { "name": "TARGET_TYPE_FILE", "number": 1 }, { "name": "TARGET_TYPE_EXTENSION_RANGE", "number": 2 }, { "name": "TARGET_TYPE_MESSAGE", "number": 3 }, { "name": "TARGET_TYPE_FIELD", "number": 4 }, { "name": "TARGET_TYPE_ONEOF", "number": 5 }, { "name": "TARGET_TYPE_ENUM", "number": 6 }, { "name": "TARGET_TYPE_ENUM_ENTRY", "number": 7 }, { "name": "TARGET_TYPE_SERVICE", "number": 8 }, { "name": "TARGET_TYPE_METHOD", "number": 9 }] }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "OneofOptions", "field": [{ "name": "features", "number": 1, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "EnumOptions", "field": [{ "name": "allow_alias", "number": 2, "type": 8, "label": 1 }, { "name": "deprecated", "number": 3, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "deprecated_legacy_json_field_conflicts", "number": 6, "type": 8, "label": 1, "options": { "deprecated": true } }, { "name": "features", "number": 7, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "EnumValueOptions", "field": [{ "name": "deprecated", "number": 1, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "features", "number": 2, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "debug_redact", "number": 3, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "feature_support", "number": 4, "type": 11, "label": 1, "typeName": ".google.protobuf.FieldOptions.FeatureSupport" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "ServiceOptions", "field": [{ "name": "features", "number": 34, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "deprecated", "number": 33, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "MethodOptions", "field": [{ "name": "deprecated", "number": 33, "type": 8, "label": 1, "defaultValue": "false" }, { "name": "idempotency_level", "number": 34, "type": 14, "label": 1, "typeName": ".google.protobuf.MethodOptions.IdempotencyLevel", "defaultValue": "IDEMPOTENCY_UNKNOWN" }, { "name": "features", "number": 35, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "uninterpreted_option", "number": 999, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption" }], "enumType": [{ "name": "IdempotencyLevel", "value": [{ "name": "IDEMPOTENCY_UNKNOWN", "number": 0 }, { "name": "NO_SIDE_EFFECTS", "number": 1 }, { "name": "IDEMPOTENT", "number": 2 }] }], "extensionRange": [{ "start": 990, "end": 999 }, { "start": 1e3, "end": 536870912 }] }, { "name": "UninterpretedOption", "field": [{ "name": "name", "number": 2, "type": 11, "label": 3, "typeName": ".google.protobuf.UninterpretedOption.NamePart" }, { "name": "identifier_value", "number": 3, "type": 9, "label": 1 }, { "name": "positive_int_value", "number": 4, "type": 4, "label": 1 }, { "name": "negative_int_value", "number": 5, "type": 3, "label": 1 }, { "name": "double_value", "number": 6, "type": 1, "label": 1 }, { "name": "string_value", "number": 7, "type": 12, "label": 1 }, { "name": "aggregate_value", "number": 8, "type": 9, "label": 1 }], "nestedType": [{ "name": "NamePart", "field": [{ "name": "name_part", "number": 1, "type": 9, "label": 2 }, { "name": "is_extension", "number": 2, "type": 8, "label": 2 }] }] }, { "name": "FeatureSet", "field": [{ "name": "field_presence", "number": 1, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.FieldPresence", "options": { "retention": 1, "targets": [4, 1], "editionDefaults": [{ "value": "EXPLICIT", "edition": 900 }, { "value": "IMPLICIT", "edition": 999 }, { "value": "EXPLICIT", "edition": 1e3 }] } }, { "name": "enum_type", "number": 2, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.EnumType", "options": { "retention": 1, "targets": [6, 1], "editionDefaults": [{ "value": "CLOSED", "edition": 900 }, { "value": "OPEN", "edition": 999 }] } }, { "name": "repeated_field_encoding", "number": 3, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.RepeatedFieldEncoding", "options": { "retention": 1, "targets": [4, 1], "editionDefaults": [{ "value": "EXPANDED", "edition": 900 }, { "value": "PACKED", "edition": 999 }] } }, { "name": "utf8_validation", "number": 4, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.Utf8Validation", "options": { "retention": 1, "targets": [4, 1], "editionDefaults": [{ "value": "NONE", "edition": 900 }, { "value": "VERIFY", "edition": 999 }] } }, { "name": "message_encoding", "number": 5, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.MessageEncoding", "options": { "retention": 1, "targets": [4, 1], "editionDefaults": [{ "value": "LENGTH_PREFIXED", "edition": 900 }] } }, { "name": "json_format", "number": 6, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.JsonFormat", "options": { "retention": 1, "targets": [3, 6, 1], "editionDefaults": [{ "value": "LEGACY_BEST_EFFORT", "edition": 900 }, { "value": "ALLOW", "edition": 999 }] } }, { "name": "enforce_naming_style", "number": 7, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.EnforceNamingStyle", "options": { "retention": 2, "targets": [1, 2, 3, 4, 5, 6, 7, 8, 9], "editionDefaults": [{ "value": "STYLE_LEGACY", "edition": 900 }, { "value": "STYLE2024", "edition": 1001 }, { "value": "STYLE2026", "edition": 1002 }] } }, { "name": "default_symbol_visibility", "number": 8, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.VisibilityFeature.DefaultSymbolVisibility", "options": { "retention": 2, "targets": [1], "editionDefaults": [{ "value": "EXPORT_ALL", "edition": 900 }, { "value": "EXPORT_TOP_LEVEL", "edition": 1001 }, { "value": "STRICT", "edition": 1002 }] } }, { "name": "enforce_proto_limits", "number": 9, "type": 14, "label": 1, "typeName": ".google.protobuf.FeatureSet.ProtoLimitsFeature.EnforceProtoLimits", "options": { "retention": 2, "targets": [6, 3, 4, 5], "editionDefaults": [{ "value": "LEGACY_NO_EXPLICIT_LIMITS", "edition": 900 }, { "value": "PROTO_LIMITS2026", "edition": 1002 }] } }], "nestedType": [{ "name": "VisibilityFeature", "enumType": [{ "name": "DefaultSymbolVisibility", "value": [{ "name": "DEFAULT_SYMBOL_VISIBILITY_UNKNOWN", "number": 0 }, { "name": "EXPORT_ALL", "number": 1 }, { "name": "EXPORT_TOP_LEVEL", "number": 2 }, { "name": "LOCAL_ALL", "number": 3 }, { "name": "STRICT", "number": 4 }] }] }, { "name": "ProtoLimitsFeature", "enumType": [{ "name": "EnforceProtoLimits", "value": [{ "name": "PROTO_LIMITS_UNKNOWN", "number": 0 }, { "name": "LEGACY_NO_EXPLICIT_LIMITS", "number": 1 }, { "name": "PROTO_LIMITS2026", "number": 2 }] }] }], "enumType": [{ "name": "FieldPresence", "value": [{ "name": "FIELD_PRESENCE_UNKNOWN", "number": 0 }, { "name": "EXPLICIT", "number": 1 }, { "name": "IMPLICIT", "number": 2 }, { "name": "LEGACY_REQUIRED", "number": 3 }] }, { "name": "EnumType", "value": [{ "name": "ENUM_TYPE_UNKNOWN", "number": 0 }, { "name": "OPEN", "number": 1 }, { "name": "CLOSED", "number": 2 }] }, { "name": "RepeatedFieldEncoding", "value": [{ "name": "REPEATED_FIELD_ENCODING_UNKNOWN", "number": 0 }, { "name": "PACKED", "number": 1 }, { "name": "EXPANDED", "number": 2 }] }, { "name": "Utf8Validation", "value": [{ "name": "UTF8_VALIDATION_UNKNOWN", "number": 0 }, { "name": "VERIFY", "number": 2 }, { "name": "NONE", "number": 3 }] }, { "name": "MessageEncoding", "value": [{ "name": "MESSAGE_ENCODING_UNKNOWN", "number": 0 }, { "name": "LENGTH_PREFIXED", "number": 1 }, { "name": "DELIMITED", "number": 2 }] }, { "name": "JsonFormat", "value": [{ "name": "JSON_FORMAT_UNKNOWN", "number": 0 }, { "name": "ALLOW", "number": 1 }, { "name": "LEGACY_BEST_EFFORT", "number": 2 }] }, { "name": "EnforceNamingStyle", "value": [{ "name": "ENFORCE_NAMING_STYLE_UNKNOWN", "number": 0 }, { "name": "STYLE2024", "number": 1 }, { "name": "STYLE_LEGACY", "number": 2 }, { "name": "STYLE2026", "number": 3 }] }], "extensionRange": [{ "start": 1e3, "end": 9995 }, { "start": 9995, "end": 1e4 }, { "start": 1e4, "end": 10001 }] }, { "name": "FeatureSetDefaults", "field": [{ "name": "defaults", "number": 1, "type": 11, "label": 3, "typeName": ".google.protobuf.FeatureSetDefaults.FeatureSetEditionDefault" }, { "name": "minimum_edition", "number": 4, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }, { "name": "maximum_edition", "number": 5, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }], "nestedType": [{ "name": "FeatureSetEditionDefault", "field": [{ "name": "edition", "number": 3, "type": 14, "label": 1, "typeName": ".google.protobuf.Edition" }, { "name": "overridable_features", "number": 4, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }, { "name": "fixed_features", "number": 5, "type": 11, "label": 1, "typeName": ".google.protobuf.FeatureSet" }] }] }, { "name": "SourceCodeInfo", "field": [{ "name": "location", "number": 1, "type": 11, "label": 3, "typeName": ".google.protobuf.SourceCodeInfo.Location" }], "nestedType": [{ "name": "Location", "field": [{ "name": "path", "number": 1, "type": 5, "label": 3, "options": { "packed": true } }, { "name": "span", "number": 2, "type": 5, "label": 3, "options": { "packed": true } }, { "name": "leading_comments", "number": 3, "type": 9, "label": 1 }, { "name": "trailing_comments", "number": 4, "type": 9, "label": 1 }, { "name": "leading_detached_comments", "number": 6, "type": 9, "label": 3 }] }], "extensionRange": [{ "start": 536e6, "end": 536000001 }] }, { "name": "GeneratedCodeInfo", "field": [{ "name": "annotation", "number": 1, "type": 11, "label": 3, "typeName": ".google.protobuf.GeneratedCodeInfo.Annotation" }], "nestedType": [{ "name": "Annotation", "field": [{ "name": "path", "number": 1, "type": 5, "label": 3, "options": { "packed": true } }, { "name": "source_file", "number": 2, "type": 9, "label": 1 }, { "name": "begin", "number": 3, "type": 5, "label": 1 }, { "name": "end", "number": 4, "type": 5, "label": 1 }, { "name": "semantic", "number": 5, "type": 14, "label": 1, "typeName": ".google.protobuf.GeneratedCodeInfo.Annotation.Semantic" }], "enumType": [{ "name": "Semantic", "value": [{ "name": "NONE", "number": 0 }, { "name": "SET", "number": 1 }, { "name": "ALIAS", "number": 2 }] }] }] }], "enumType": [{ "name": "Edition", "value": [{ "name": "EDITION_UNKNOWN", "number": 0 }, { "name": "EDITION_LEGACY", "number": 900 }, { "name": "EDITION_PROTO2", "number": 998 }, { "name": "EDITION_PROTO3", "number": 999 }, { "name": "EDITION_2023", "number": 1e3 }, { "name": "EDITION_2024", "number": 1001 }, { "name": "EDITION_2026", "number": 1002 }, { "name": "EDITION_UNSTABLE", "number": 9999 }, { "name": "EDITION_1_TEST_ONLY", "number": 1 }, { "name": "EDITION_2_TEST_ONLY", "number": 2 }, { "name": "EDITION_99997_TEST_ONLY", "number": 99997 }, { "name": "EDITION_99998_TEST_ONLY", "number": 99998 }, { "name": "EDITION_99999_TEST_ONLY", "number": 99999 }, { "name": "EDITION_MAX", "number": 2147483647 }] }, { "name": "SymbolVisibility", "value": [{ "name": "VISIBILITY_UNSET", "number": 0 }, { "name": "VISIBILITY_LOCAL", "number": 1 }, { "name": "VISIBILITY_EXPORT", "number": 2 }] }] });
var FileDescriptorProtoSchema = /* @__PURE__ */ messageDesc(file_google_protobuf_descriptor, 1);
var ExtensionRangeOptions_VerificationState;
(function(ExtensionRangeOptions_VerificationState2) {
  ExtensionRangeOptions_VerificationState2[ExtensionRangeOptions_VerificationState2["DECLARATION"] = 0] = "DECLARATION";
  ExtensionRangeOptions_VerificationState2[ExtensionRangeOptions_VerificationState2["UNVERIFIED"] = 1] = "UNVERIFIED";
})(ExtensionRangeOptions_VerificationState || (ExtensionRangeOptions_VerificationState = {}));
var FieldDescriptorProto_Type;
(function(FieldDescriptorProto_Type2) {
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["DOUBLE"] = 1] = "DOUBLE";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["FLOAT"] = 2] = "FLOAT";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["INT64"] = 3] = "INT64";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["UINT64"] = 4] = "UINT64";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["INT32"] = 5] = "INT32";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["FIXED64"] = 6] = "FIXED64";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["FIXED32"] = 7] = "FIXED32";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["BOOL"] = 8] = "BOOL";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["STRING"] = 9] = "STRING";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["GROUP"] = 10] = "GROUP";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["MESSAGE"] = 11] = "MESSAGE";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["BYTES"] = 12] = "BYTES";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["UINT32"] = 13] = "UINT32";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["ENUM"] = 14] = "ENUM";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["SFIXED32"] = 15] = "SFIXED32";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["SFIXED64"] = 16] = "SFIXED64";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["SINT32"] = 17] = "SINT32";
  FieldDescriptorProto_Type2[FieldDescriptorProto_Type2["SINT64"] = 18] = "SINT64";
})(FieldDescriptorProto_Type || (FieldDescriptorProto_Type = {}));
var FieldDescriptorProto_Label;
(function(FieldDescriptorProto_Label2) {
  FieldDescriptorProto_Label2[FieldDescriptorProto_Label2["OPTIONAL"] = 1] = "OPTIONAL";
  FieldDescriptorProto_Label2[FieldDescriptorProto_Label2["REPEATED"] = 3] = "REPEATED";
  FieldDescriptorProto_Label2[FieldDescriptorProto_Label2["REQUIRED"] = 2] = "REQUIRED";
})(FieldDescriptorProto_Label || (FieldDescriptorProto_Label = {}));
var FileOptions_OptimizeMode;
(function(FileOptions_OptimizeMode2) {
  FileOptions_OptimizeMode2[FileOptions_OptimizeMode2["SPEED"] = 1] = "SPEED";
  FileOptions_OptimizeMode2[FileOptions_OptimizeMode2["CODE_SIZE"] = 2] = "CODE_SIZE";
  FileOptions_OptimizeMode2[FileOptions_OptimizeMode2["LITE_RUNTIME"] = 3] = "LITE_RUNTIME";
})(FileOptions_OptimizeMode || (FileOptions_OptimizeMode = {}));
var FieldOptions_CType;
(function(FieldOptions_CType2) {
  FieldOptions_CType2[FieldOptions_CType2["STRING"] = 0] = "STRING";
  FieldOptions_CType2[FieldOptions_CType2["CORD"] = 1] = "CORD";
  FieldOptions_CType2[FieldOptions_CType2["STRING_PIECE"] = 2] = "STRING_PIECE";
})(FieldOptions_CType || (FieldOptions_CType = {}));
var FieldOptions_JSType;
(function(FieldOptions_JSType2) {
  FieldOptions_JSType2[FieldOptions_JSType2["JS_NORMAL"] = 0] = "JS_NORMAL";
  FieldOptions_JSType2[FieldOptions_JSType2["JS_STRING"] = 1] = "JS_STRING";
  FieldOptions_JSType2[FieldOptions_JSType2["JS_NUMBER"] = 2] = "JS_NUMBER";
})(FieldOptions_JSType || (FieldOptions_JSType = {}));
var FieldOptions_OptionRetention;
(function(FieldOptions_OptionRetention2) {
  FieldOptions_OptionRetention2[FieldOptions_OptionRetention2["RETENTION_UNKNOWN"] = 0] = "RETENTION_UNKNOWN";
  FieldOptions_OptionRetention2[FieldOptions_OptionRetention2["RETENTION_RUNTIME"] = 1] = "RETENTION_RUNTIME";
  FieldOptions_OptionRetention2[FieldOptions_OptionRetention2["RETENTION_SOURCE"] = 2] = "RETENTION_SOURCE";
})(FieldOptions_OptionRetention || (FieldOptions_OptionRetention = {}));
var FieldOptions_OptionTargetType;
(function(FieldOptions_OptionTargetType2) {
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_UNKNOWN"] = 0] = "TARGET_TYPE_UNKNOWN";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_FILE"] = 1] = "TARGET_TYPE_FILE";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_EXTENSION_RANGE"] = 2] = "TARGET_TYPE_EXTENSION_RANGE";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_MESSAGE"] = 3] = "TARGET_TYPE_MESSAGE";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_FIELD"] = 4] = "TARGET_TYPE_FIELD";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_ONEOF"] = 5] = "TARGET_TYPE_ONEOF";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_ENUM"] = 6] = "TARGET_TYPE_ENUM";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_ENUM_ENTRY"] = 7] = "TARGET_TYPE_ENUM_ENTRY";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_SERVICE"] = 8] = "TARGET_TYPE_SERVICE";
  FieldOptions_OptionTargetType2[FieldOptions_OptionTargetType2["TARGET_TYPE_METHOD"] = 9] = "TARGET_TYPE_METHOD";
})(FieldOptions_OptionTargetType || (FieldOptions_OptionTargetType = {}));
var MethodOptions_IdempotencyLevel;
(function(MethodOptions_IdempotencyLevel2) {
  MethodOptions_IdempotencyLevel2[MethodOptions_IdempotencyLevel2["IDEMPOTENCY_UNKNOWN"] = 0] = "IDEMPOTENCY_UNKNOWN";
  MethodOptions_IdempotencyLevel2[MethodOptions_IdempotencyLevel2["NO_SIDE_EFFECTS"] = 1] = "NO_SIDE_EFFECTS";
  MethodOptions_IdempotencyLevel2[MethodOptions_IdempotencyLevel2["IDEMPOTENT"] = 2] = "IDEMPOTENT";
})(MethodOptions_IdempotencyLevel || (MethodOptions_IdempotencyLevel = {}));
var FeatureSet_VisibilityFeature_DefaultSymbolVisibility;
(function(FeatureSet_VisibilityFeature_DefaultSymbolVisibility2) {
  FeatureSet_VisibilityFeature_DefaultSymbolVisibility2[FeatureSet_VisibilityFeature_DefaultSymbolVisibility2["DEFAULT_SYMBOL_VISIBILITY_UNKNOWN"] = 0] = "DEFAULT_SYMBOL_VISIBILITY_UNKNOWN";
  FeatureSet_VisibilityFeature_DefaultSymbolVisibility2[FeatureSet_VisibilityFeature_DefaultSymbolVisibility2["EXPORT_ALL"] = 1] = "EXPORT_ALL";
  FeatureSet_VisibilityFeature_DefaultSymbolVisibility2[FeatureSet_VisibilityFeature_DefaultSymbolVisibility2["EXPORT_TOP_LEVEL"] = 2] = "EXPORT_TOP_LEVEL";
  FeatureSet_VisibilityFeature_DefaultSymbolVisibility2[FeatureSet_VisibilityFeature_DefaultSymbolVisibility2["LOCAL_ALL"] = 3] = "LOCAL_ALL";
  FeatureSet_VisibilityFeature_DefaultSymbolVisibility2[FeatureSet_VisibilityFeature_DefaultSymbolVisibility2["STRICT"] = 4] = "STRICT";
})(FeatureSet_VisibilityFeature_DefaultSymbolVisibility || (FeatureSet_VisibilityFeature_DefaultSymbolVisibility = {}));
var FeatureSet_ProtoLimitsFeature_EnforceProtoLimits;
(function(FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2) {
  FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2[FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2["PROTO_LIMITS_UNKNOWN"] = 0] = "PROTO_LIMITS_UNKNOWN";
  FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2[FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2["LEGACY_NO_EXPLICIT_LIMITS"] = 1] = "LEGACY_NO_EXPLICIT_LIMITS";
  FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2[FeatureSet_ProtoLimitsFeature_EnforceProtoLimits2["PROTO_LIMITS2026"] = 2] = "PROTO_LIMITS2026";
})(FeatureSet_ProtoLimitsFeature_EnforceProtoLimits || (FeatureSet_ProtoLimitsFeature_EnforceProtoLimits = {}));
var FeatureSet_FieldPresence;
(function(FeatureSet_FieldPresence2) {
  FeatureSet_FieldPresence2[FeatureSet_FieldPresence2["FIELD_PRESENCE_UNKNOWN"] = 0] = "FIELD_PRESENCE_UNKNOWN";
  FeatureSet_FieldPresence2[FeatureSet_FieldPresence2["EXPLICIT"] = 1] = "EXPLICIT";
  FeatureSet_FieldPresence2[FeatureSet_FieldPresence2["IMPLICIT"] = 2] = "IMPLICIT";
  FeatureSet_FieldPresence2[FeatureSet_FieldPresence2["LEGACY_REQUIRED"] = 3] = "LEGACY_REQUIRED";
})(FeatureSet_FieldPresence || (FeatureSet_FieldPresence = {}));
var FeatureSet_EnumType;
(function(FeatureSet_EnumType2) {
  FeatureSet_EnumType2[FeatureSet_EnumType2["ENUM_TYPE_UNKNOWN"] = 0] = "ENUM_TYPE_UNKNOWN";
  FeatureSet_EnumType2[FeatureSet_EnumType2["OPEN"] = 1] = "OPEN";
  FeatureSet_EnumType2[FeatureSet_EnumType2["CLOSED"] = 2] = "CLOSED";
})(FeatureSet_EnumType || (FeatureSet_EnumType = {}));
var FeatureSet_RepeatedFieldEncoding;
(function(FeatureSet_RepeatedFieldEncoding2) {
  FeatureSet_RepeatedFieldEncoding2[FeatureSet_RepeatedFieldEncoding2["REPEATED_FIELD_ENCODING_UNKNOWN"] = 0] = "REPEATED_FIELD_ENCODING_UNKNOWN";
  FeatureSet_RepeatedFieldEncoding2[FeatureSet_RepeatedFieldEncoding2["PACKED"] = 1] = "PACKED";
  FeatureSet_RepeatedFieldEncoding2[FeatureSet_RepeatedFieldEncoding2["EXPANDED"] = 2] = "EXPANDED";
})(FeatureSet_RepeatedFieldEncoding || (FeatureSet_RepeatedFieldEncoding = {}));
var FeatureSet_Utf8Validation;
(function(FeatureSet_Utf8Validation2) {
  FeatureSet_Utf8Validation2[FeatureSet_Utf8Validation2["UTF8_VALIDATION_UNKNOWN"] = 0] = "UTF8_VALIDATION_UNKNOWN";
  FeatureSet_Utf8Validation2[FeatureSet_Utf8Validation2["VERIFY"] = 2] = "VERIFY";
  FeatureSet_Utf8Validation2[FeatureSet_Utf8Validation2["NONE"] = 3] = "NONE";
})(FeatureSet_Utf8Validation || (FeatureSet_Utf8Validation = {}));
var FeatureSet_MessageEncoding;
(function(FeatureSet_MessageEncoding2) {
  FeatureSet_MessageEncoding2[FeatureSet_MessageEncoding2["MESSAGE_ENCODING_UNKNOWN"] = 0] = "MESSAGE_ENCODING_UNKNOWN";
  FeatureSet_MessageEncoding2[FeatureSet_MessageEncoding2["LENGTH_PREFIXED"] = 1] = "LENGTH_PREFIXED";
  FeatureSet_MessageEncoding2[FeatureSet_MessageEncoding2["DELIMITED"] = 2] = "DELIMITED";
})(FeatureSet_MessageEncoding || (FeatureSet_MessageEncoding = {}));
var FeatureSet_JsonFormat;
(function(FeatureSet_JsonFormat2) {
  FeatureSet_JsonFormat2[FeatureSet_JsonFormat2["JSON_FORMAT_UNKNOWN"] = 0] = "JSON_FORMAT_UNKNOWN";
  FeatureSet_JsonFormat2[FeatureSet_JsonFormat2["ALLOW"] = 1] = "ALLOW";
  FeatureSet_JsonFormat2[FeatureSet_JsonFormat2["LEGACY_BEST_EFFORT"] = 2] = "LEGACY_BEST_EFFORT";
})(FeatureSet_JsonFormat || (FeatureSet_JsonFormat = {}));
var FeatureSet_EnforceNamingStyle;
(function(FeatureSet_EnforceNamingStyle2) {
  FeatureSet_EnforceNamingStyle2[FeatureSet_EnforceNamingStyle2["ENFORCE_NAMING_STYLE_UNKNOWN"] = 0] = "ENFORCE_NAMING_STYLE_UNKNOWN";
  FeatureSet_EnforceNamingStyle2[FeatureSet_EnforceNamingStyle2["STYLE2024"] = 1] = "STYLE2024";
  FeatureSet_EnforceNamingStyle2[FeatureSet_EnforceNamingStyle2["STYLE_LEGACY"] = 2] = "STYLE_LEGACY";
  FeatureSet_EnforceNamingStyle2[FeatureSet_EnforceNamingStyle2["STYLE2026"] = 3] = "STYLE2026";
})(FeatureSet_EnforceNamingStyle || (FeatureSet_EnforceNamingStyle = {}));
var GeneratedCodeInfo_Annotation_Semantic;
(function(GeneratedCodeInfo_Annotation_Semantic2) {
  GeneratedCodeInfo_Annotation_Semantic2[GeneratedCodeInfo_Annotation_Semantic2["NONE"] = 0] = "NONE";
  GeneratedCodeInfo_Annotation_Semantic2[GeneratedCodeInfo_Annotation_Semantic2["SET"] = 1] = "SET";
  GeneratedCodeInfo_Annotation_Semantic2[GeneratedCodeInfo_Annotation_Semantic2["ALIAS"] = 2] = "ALIAS";
})(GeneratedCodeInfo_Annotation_Semantic || (GeneratedCodeInfo_Annotation_Semantic = {}));
var Edition;
(function(Edition2) {
  Edition2[Edition2["EDITION_UNKNOWN"] = 0] = "EDITION_UNKNOWN";
  Edition2[Edition2["EDITION_LEGACY"] = 900] = "EDITION_LEGACY";
  Edition2[Edition2["EDITION_PROTO2"] = 998] = "EDITION_PROTO2";
  Edition2[Edition2["EDITION_PROTO3"] = 999] = "EDITION_PROTO3";
  Edition2[Edition2["EDITION_2023"] = 1e3] = "EDITION_2023";
  Edition2[Edition2["EDITION_2024"] = 1001] = "EDITION_2024";
  Edition2[Edition2["EDITION_2026"] = 1002] = "EDITION_2026";
  Edition2[Edition2["EDITION_UNSTABLE"] = 9999] = "EDITION_UNSTABLE";
  Edition2[Edition2["EDITION_1_TEST_ONLY"] = 1] = "EDITION_1_TEST_ONLY";
  Edition2[Edition2["EDITION_2_TEST_ONLY"] = 2] = "EDITION_2_TEST_ONLY";
  Edition2[Edition2["EDITION_99997_TEST_ONLY"] = 99997] = "EDITION_99997_TEST_ONLY";
  Edition2[Edition2["EDITION_99998_TEST_ONLY"] = 99998] = "EDITION_99998_TEST_ONLY";
  Edition2[Edition2["EDITION_99999_TEST_ONLY"] = 99999] = "EDITION_99999_TEST_ONLY";
  Edition2[Edition2["EDITION_MAX"] = 2147483647] = "EDITION_MAX";
})(Edition || (Edition = {}));
var SymbolVisibility;
(function(SymbolVisibility2) {
  SymbolVisibility2[SymbolVisibility2["VISIBILITY_UNSET"] = 0] = "VISIBILITY_UNSET";
  SymbolVisibility2[SymbolVisibility2["VISIBILITY_LOCAL"] = 1] = "VISIBILITY_LOCAL";
  SymbolVisibility2[SymbolVisibility2["VISIBILITY_EXPORT"] = 2] = "VISIBILITY_EXPORT";
})(SymbolVisibility || (SymbolVisibility = {}));

// node_modules/@bufbuild/protobuf/dist/esm/from-binary.js
function makeReadContext(options) {
  return Object.assign(Object.assign({ readUnknownFields: true, recursionLimit: 100 }, options), { depth: 0 });
}
function fromBinary(schema, bytes, options) {
  const message = create(schema);
  compiledReader(schema).read(message, new BinaryReader(bytes), makeReadContext(options), bytes.byteLength);
  return message;
}
var compiledReaders = /* @__PURE__ */ new WeakMap();
function compiledReader(desc) {
  let compiled = compiledReaders.get(desc);
  if (compiled === void 0) {
    compiled = compileMessage(desc);
  }
  return compiled;
}
function compileMessage(desc) {
  const descString = String(desc);
  const fieldReaders = /* @__PURE__ */ new Map();
  const compiled = {
    read: compileMessageReader(descString, fieldReaders),
    readGroup: compileGroupReader(descString, fieldReaders)
  };
  compiledReaders.set(desc, compiled);
  for (const field of desc.fields) {
    fieldReaders.set(field.number, compileFieldReader(field));
  }
  return compiled;
}
function compileMessageReader(descString, fieldReaders) {
  return (message, reader, ctx, length) => {
    var _a;
    if (++ctx.depth > ctx.recursionLimit) {
      throw new Error(`cannot decode ${descString} from binary: maximum recursion depth of ${ctx.recursionLimit} reached`);
    }
    const end = reader.pos + length;
    const unknownFields = (_a = message.$unknown) !== null && _a !== void 0 ? _a : [];
    while (reader.pos < end) {
      const [fieldNo, wireType] = reader.tag();
      const fieldReader = fieldReaders.get(fieldNo);
      if (fieldReader === void 0) {
        const data = reader.skip(wireType, fieldNo, ctx.recursionLimit - ctx.depth);
        if (ctx.readUnknownFields) {
          unknownFields.push({ no: fieldNo, wireType, data });
        }
        continue;
      }
      fieldReader(message, reader, ctx, wireType);
    }
    if (unknownFields.length > 0) {
      message.$unknown = unknownFields;
    }
    ctx.depth--;
  };
}
function compileGroupReader(descString, fieldReaders) {
  return (message, reader, ctx, fieldNo) => {
    var _a;
    if (++ctx.depth > ctx.recursionLimit) {
      throw new Error(`cannot decode ${descString} from binary: maximum recursion depth of ${ctx.recursionLimit} reached`);
    }
    let recordFieldNo;
    let wireType;
    const unknownFields = (_a = message.$unknown) !== null && _a !== void 0 ? _a : [];
    while (reader.pos < reader.len) {
      [recordFieldNo, wireType] = reader.tag();
      if (wireType == WireType.EndGroup) {
        break;
      }
      const fieldReader = fieldReaders.get(recordFieldNo);
      if (fieldReader === void 0) {
        const data = reader.skip(wireType, recordFieldNo, ctx.recursionLimit - ctx.depth);
        if (ctx.readUnknownFields) {
          unknownFields.push({ no: recordFieldNo, wireType, data });
        }
        continue;
      }
      fieldReader(message, reader, ctx, wireType);
    }
    if (wireType != WireType.EndGroup || recordFieldNo !== fieldNo) {
      throw new Error("invalid end group tag");
    }
    if (unknownFields.length > 0) {
      message.$unknown = unknownFields;
    }
    ctx.depth--;
  };
}
function compileFieldReader(field) {
  switch (field.fieldKind) {
    case "scalar":
      return compileScalarFieldReader(field);
    case "enum":
      return compileEnumFieldReader(field);
    case "message":
      return compileMessageFieldReader(field);
    case "list":
      return compileListFieldReader(field);
    case "map":
      return compileMapFieldReader(field);
  }
}
function compileScalarFieldReader(field) {
  const readScalar = compileScalarReader(field.scalar, field.utf8Validation, field.longAsString);
  const localName = field.localName;
  if (field.oneof) {
    const oneofLocalName = field.oneof.localName;
    return (message, reader) => {
      message[oneofLocalName] = {
        case: localName,
        value: readScalar(reader)
      };
    };
  }
  return (message, reader) => {
    message[localName] = readScalar(reader);
  };
}
function compileEnumFieldReader(field) {
  var _a;
  const localName = field.localName;
  const oneofLocalName = (_a = field.oneof) === null || _a === void 0 ? void 0 : _a.localName;
  if (field.enum.open) {
    if (oneofLocalName !== void 0) {
      return (message, reader) => {
        message[oneofLocalName] = { case: localName, value: reader.int32() };
      };
    }
    return (message, reader) => {
      message[localName] = reader.int32();
    };
  }
  const values = field.enum.values;
  const fieldNo = field.number;
  return (message, reader, ctx, wireType) => {
    var _a2;
    const val = reader.int32();
    if (values.some((v) => v.number === val)) {
      if (oneofLocalName !== void 0) {
        message[oneofLocalName] = { case: localName, value: val };
      } else {
        message[localName] = val;
      }
    } else if (ctx.readUnknownFields) {
      const bytes = [];
      varint32write(val, bytes);
      const unknownFields = (_a2 = message.$unknown) !== null && _a2 !== void 0 ? _a2 : [];
      unknownFields.push({
        no: fieldNo,
        wireType,
        data: new Uint8Array(bytes)
      });
      message.$unknown = unknownFields;
    }
  };
}
function compileMessageFieldReader(field) {
  const localName = field.localName;
  const { toMessage, toLocal } = localMessageMapper(field);
  const readChild = compileChildReader(field);
  if (field.oneof) {
    const oneofLocalName = field.oneof.localName;
    return (message, reader, ctx) => {
      const oneof = message[oneofLocalName];
      const child = toMessage(oneof.case === localName ? oneof.value : void 0);
      readChild(child, reader, ctx);
      message[oneofLocalName] = { case: localName, value: toLocal(child) };
    };
  }
  return (message, reader, ctx) => {
    const child = toMessage(message[localName]);
    readChild(child, reader, ctx);
    message[localName] = toLocal(child);
  };
}
function compileChildReader(field) {
  const compiledChild = compiledReader(field.message);
  if (field.delimitedEncoding) {
    const fieldNo = field.number;
    return (child, reader, ctx) => compiledChild.readGroup(child, reader, ctx, fieldNo);
  }
  return (child, reader, ctx) => compiledChild.read(child, reader, ctx, reader.uint32());
}
function compileListFieldReader(field) {
  const localName = field.localName;
  if (field.listKind == "message") {
    const { toMessage, toLocal } = localMessageMapper(field);
    const readChild = compileChildReader(field);
    return (message, reader, ctx) => {
      const child = toMessage(void 0);
      readChild(child, reader, ctx);
      message[localName].push(toLocal(child));
    };
  }
  const scalarType = field.listKind == "enum" ? ScalarType.INT32 : field.scalar;
  const longAsString = field.listKind == "scalar" ? field.longAsString : false;
  const readScalar = compileScalarReader(scalarType, field.utf8Validation, longAsString);
  const packedPossible = scalarType != ScalarType.STRING && scalarType != ScalarType.BYTES;
  return (message, reader, ctx, wireType) => {
    const items = message[localName];
    if (wireType == WireType.LengthDelimited && packedPossible) {
      const end = reader.uint32() + reader.pos;
      while (reader.pos < end) {
        items.push(readScalar(reader));
      }
    } else {
      items.push(readScalar(reader));
    }
  };
}
function compileMapFieldReader(field) {
  const localName = field.localName;
  const readKey = compileScalarReader(field.mapKey, field.utf8Validation, false);
  const keyZero = scalarZeroValue(field.mapKey, false);
  let readValue;
  let valueDefault;
  switch (field.mapKind) {
    case "scalar": {
      const scalar = field.scalar;
      const readScalar = compileScalarReader(scalar, field.utf8Validation, false);
      readValue = (reader) => readScalar(reader);
      if (scalar == ScalarType.BYTES) {
        valueDefault = () => new Uint8Array(0);
      } else {
        const zero = scalarZeroValue(scalar, false);
        valueDefault = () => zero;
      }
      break;
    }
    case "enum": {
      const zero = field.enum.values[0].number;
      readValue = (reader) => reader.int32();
      valueDefault = () => zero;
      break;
    }
    case "message": {
      const { toMessage, toLocal } = localMessageMapper(field);
      const readChild = compiledReader(field.message).read;
      readValue = (reader, ctx, existing) => {
        const child = toMessage(existing);
        readChild(child, reader, ctx, reader.uint32());
        return toLocal(child);
      };
      valueDefault = () => toLocal(toMessage(void 0));
      break;
    }
  }
  return (message, reader, ctx) => {
    const record = message[localName];
    let key;
    let val;
    const len = reader.uint32();
    const end = reader.pos + len;
    while (reader.pos < end) {
      const [fieldNo, wireType] = reader.tag();
      switch (fieldNo) {
        case 1:
          key = readKey(reader);
          break;
        case 2:
          val = readValue(reader, ctx, val);
          break;
        default:
          reader.skip(wireType, fieldNo, ctx.recursionLimit - ctx.depth);
      }
    }
    if (key === void 0) {
      key = keyZero;
    }
    if (val === void 0) {
      val = valueDefault();
    }
    setOwn(record, key, val);
  };
}
function compileScalarReader(type, utf8Validation, longAsString) {
  switch (type) {
    case ScalarType.STRING:
      return (reader) => reader.string(utf8Validation);
    case ScalarType.BOOL:
      return (reader) => reader.bool();
    case ScalarType.DOUBLE:
      return (reader) => reader.double();
    case ScalarType.FLOAT:
      return (reader) => reader.float();
    case ScalarType.INT32:
      return (reader) => reader.int32();
    case ScalarType.INT64:
      if (longAsString) {
        return (reader) => String(reader.int64());
      }
      return (reader) => reader.int64();
    case ScalarType.UINT64:
      if (longAsString) {
        return (reader) => String(reader.uint64());
      }
      return (reader) => reader.uint64();
    case ScalarType.FIXED64:
      if (longAsString) {
        return (reader) => String(reader.fixed64());
      }
      return (reader) => reader.fixed64();
    case ScalarType.BYTES:
      return (reader) => reader.bytes();
    case ScalarType.FIXED32:
      return (reader) => reader.fixed32();
    case ScalarType.SFIXED32:
      return (reader) => reader.sfixed32();
    case ScalarType.SFIXED64:
      if (longAsString) {
        return (reader) => String(reader.sfixed64());
      }
      return (reader) => reader.sfixed64();
    case ScalarType.SINT64:
      if (longAsString) {
        return (reader) => String(reader.sint64());
      }
      return (reader) => reader.sint64();
    case ScalarType.UINT32:
      return (reader) => reader.uint32();
    case ScalarType.SINT32:
      return (reader) => reader.sint32();
  }
}

// node_modules/@bufbuild/protobuf/dist/esm/codegenv2/file.js
function fileDesc(b64, imports) {
  var _a;
  const root = fromBinary(FileDescriptorProtoSchema, base64Decode(b64));
  root.messageType.forEach(restoreJsonNames);
  root.dependency = (_a = imports === null || imports === void 0 ? void 0 : imports.map((f) => f.proto.name)) !== null && _a !== void 0 ? _a : [];
  const reg = createEmbeddedFileRegistry(root, (protoFileName) => imports === null || imports === void 0 ? void 0 : imports.find((f) => f.proto.name === protoFileName));
  return reg.getFile(root.name);
}

// node_modules/@bufbuild/protobuf/dist/esm/to-binary.js
var IMPLICIT3 = 2;
var LEGACY_REQUIRED2 = 3;
var writeDefaults = {
  writeUnknownFields: true
};
function makeWriteOptions(options) {
  return options ? Object.assign(Object.assign({}, writeDefaults), options) : writeDefaults;
}
function toBinary(schema, message, options) {
  const writer = new BinaryWriter();
  compiledWriter(schema)(writer, makeWriteOptions(options), message);
  return writer.finish();
}
var compiledWriters = /* @__PURE__ */ new WeakMap();
function compiledWriter(desc) {
  let compiled = compiledWriters.get(desc);
  if (compiled === void 0) {
    compiled = compileMessage2(desc);
  }
  return compiled;
}
function compileMessage2(desc) {
  const typeName = desc.typeName;
  const sortedFields = desc.fields.concat().sort((a, b) => a.number - b.number);
  const foreignField = sortedFields[0];
  const fieldWriters = [];
  const compiled = (writer, opts, message) => {
    if (message.$typeName !== typeName && foreignField !== void 0) {
      throw new FieldError(foreignField, `cannot use ${foreignField} with message ${message.$typeName}`, "ForeignFieldError");
    }
    for (let i = 0; i < fieldWriters.length; i++) {
      fieldWriters[i](writer, opts, message);
    }
    const unknown = message.$unknown;
    if (unknown !== void 0 && opts.writeUnknownFields) {
      for (let i = 0; i < unknown.length; i++) {
        const { no, wireType, data } = unknown[i];
        writer.tag(no, wireType).raw(data);
      }
    }
  };
  compiledWriters.set(desc, compiled);
  for (const field of sortedFields) {
    fieldWriters.push(compileField(field));
  }
  return compiled;
}
function compileField(field) {
  switch (field.fieldKind) {
    case "message":
    case "scalar":
    case "enum":
      return compileSingularField(field);
    case "list":
      return compileListField(field);
    case "map":
      return compileMapField(field);
  }
}
function compileSingularField(field) {
  const writeValue = compileSingularValue(field);
  const localName = field.localName;
  if (field.oneof) {
    const oneofLocalName = field.oneof.localName;
    return (writer, opts, message) => {
      const oneof = message[oneofLocalName];
      if (oneof.case === localName) {
        writeValue(writer, opts, oneof.value);
      }
    };
  }
  if (field.presence != IMPLICIT3) {
    const requiredError = field.presence == LEGACY_REQUIRED2 ? `cannot encode ${field} to binary: required field not set` : void 0;
    return (writer, opts, message) => {
      const value = message[localName];
      if (value !== void 0 && Object.prototype.hasOwnProperty.call(message, localName)) {
        writeValue(writer, opts, value);
      } else if (requiredError !== void 0) {
        throw new Error(requiredError);
      }
    };
  }
  if (field.fieldKind == "enum") {
    const zero = field.enum.values[0].number;
    return (writer, opts, message) => {
      const value = message[localName];
      if (value !== zero) {
        writeValue(writer, opts, value);
      }
    };
  }
  switch (field.scalar) {
    case ScalarType.BOOL:
      return (writer, opts, message) => {
        const value = message[localName];
        if (value !== false) {
          writeValue(writer, opts, value);
        }
      };
    case ScalarType.STRING:
      return (writer, opts, message) => {
        const value = message[localName];
        if (value !== "") {
          writeValue(writer, opts, value);
        }
      };
    case ScalarType.BYTES:
      return (writer, opts, message) => {
        const value = message[localName];
        if (!(value instanceof Uint8Array) || value.byteLength > 0) {
          writeValue(writer, opts, value);
        }
      };
    case ScalarType.DOUBLE:
    case ScalarType.FLOAT:
      return (writer, opts, message) => {
        const value = message[localName];
        if (!Object.is(value, 0)) {
          writeValue(writer, opts, value);
        }
      };
    default:
      return (writer, opts, message) => {
        const value = message[localName];
        if (value != 0) {
          writeValue(writer, opts, value);
        }
      };
  }
}
function compileSingularValue(field) {
  switch (field.fieldKind) {
    case "message": {
      const { toMessage } = localMessageMapper(field);
      const writeChild = compileChildWriter(field);
      return (writer, opts, value) => {
        writeChild(writer, opts, toMessage(value));
      };
    }
    case "scalar":
    case "enum": {
      const scalarType = field.fieldKind == "enum" ? ScalarType.INT32 : field.scalar;
      const fieldNo = field.number;
      const wireType = writeTypeOfScalar(scalarType);
      const writeScalar = compileScalarValue(scalarType, field.parent.typeName, field.name);
      return (writer, opts, value) => {
        writer.tag(fieldNo, wireType);
        writeScalar(writer, value);
      };
    }
  }
}
function compileListField(field) {
  const localName = field.localName;
  const fieldNo = field.number;
  switch (field.listKind) {
    case "message": {
      const { toMessage } = localMessageMapper(field);
      const writeChild = compileChildWriter(field);
      return (writer, opts, message) => {
        const items = message[localName];
        for (let i = 0; i < items.length; i++) {
          writeChild(writer, opts, toMessage(items[i]));
        }
      };
    }
    case "scalar":
    case "enum": {
      const scalarType = field.listKind == "enum" ? ScalarType.INT32 : field.scalar;
      const writeScalar = compileScalarValue(scalarType, field.parent.typeName, field.name);
      if (field.packed) {
        return (writer, opts, message) => {
          const items = message[localName];
          if (items.length == 0) {
            return;
          }
          writer.tag(fieldNo, WireType.LengthDelimited).fork();
          for (let i = 0; i < items.length; i++) {
            writeScalar(writer, items[i]);
          }
          writer.join();
        };
      }
      const wireType = writeTypeOfScalar(scalarType);
      return (writer, opts, message) => {
        const items = message[localName];
        for (let i = 0; i < items.length; i++) {
          writer.tag(fieldNo, wireType);
          writeScalar(writer, items[i]);
        }
      };
    }
  }
}
function compileMapField(field) {
  const localName = field.localName;
  const fieldNo = field.number;
  const writeKey = compileMapKey(field);
  if (field.mapKind == "message") {
    const { toMessage } = localMessageMapper(field);
    const writeMessage = compiledWriter(field.message);
    return (writer, opts, message) => {
      const record = message[localName];
      const keys = Object.keys(record);
      for (let i = 0; i < keys.length; i++) {
        const key = keys[i];
        writer.tag(fieldNo, WireType.LengthDelimited).fork();
        writeKey(writer, key);
        writer.tag(2, WireType.LengthDelimited).fork();
        writeMessage(writer, opts, toMessage(record[key]));
        writer.join();
        writer.join();
      }
    };
  }
  const scalarType = field.mapKind == "enum" ? ScalarType.INT32 : field.scalar;
  const valueWireType = writeTypeOfScalar(scalarType);
  const writeScalar = compileScalarValue(scalarType, field.parent.typeName, field.name);
  return (writer, opts, message) => {
    const record = message[localName];
    const keys = Object.keys(record);
    for (let i = 0; i < keys.length; i++) {
      const key = keys[i];
      writer.tag(fieldNo, WireType.LengthDelimited).fork();
      writeKey(writer, key);
      writer.tag(2, valueWireType);
      writeScalar(writer, record[key]);
      writer.join();
    }
  };
}
function compileMapKey(field) {
  const wireType = writeTypeOfScalar(field.mapKey);
  const writeScalar = compileScalarValue(field.mapKey, field.parent.typeName, field.name);
  const convertKey = compileMapKeyConverter(field.mapKey);
  return (writer, key) => {
    writer.tag(1, wireType);
    writeScalar(writer, convertKey(key));
  };
}
function compileMapKeyConverter(type) {
  switch (type) {
    case ScalarType.STRING:
      return (key) => key;
    case ScalarType.BOOL:
      return (key) => key === "true" ? true : key === "false" ? false : key;
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return (key) => {
        try {
          return protoInt64.uParse(key);
        } catch (_a) {
          return key;
        }
      };
    case ScalarType.INT64:
    case ScalarType.SFIXED64:
    case ScalarType.SINT64:
      return (key) => {
        try {
          return protoInt64.parse(key);
        } catch (_a) {
          return key;
        }
      };
    default:
      return (key) => {
        const n = Number.parseInt(key);
        return Number.isFinite(n) ? n : key;
      };
  }
}
function compileScalarValue(type, messageName, fieldName) {
  const writeScalar = compileScalarWrite(type);
  return (writer, value) => {
    try {
      writeScalar(writer, value);
    } catch (e) {
      if (e instanceof Error) {
        throw new Error(`cannot encode field ${messageName}.${fieldName} to binary: ${e.message}`);
      }
      throw e;
    }
  };
}
function compileScalarWrite(type) {
  switch (type) {
    case ScalarType.STRING:
      return (writer, value) => writer.string(value);
    case ScalarType.BOOL:
      return (writer, value) => writer.bool(value);
    case ScalarType.DOUBLE:
      return (writer, value) => writer.double(value);
    case ScalarType.FLOAT:
      return (writer, value) => writer.float(value);
    case ScalarType.INT32:
      return (writer, value) => writer.int32(value);
    case ScalarType.INT64:
      return (writer, value) => writer.int64(value);
    case ScalarType.UINT64:
      return (writer, value) => writer.uint64(value);
    case ScalarType.FIXED64:
      return (writer, value) => writer.fixed64(value);
    case ScalarType.BYTES:
      return (writer, value) => writer.bytes(value);
    case ScalarType.FIXED32:
      return (writer, value) => writer.fixed32(value);
    case ScalarType.SFIXED32:
      return (writer, value) => writer.sfixed32(value);
    case ScalarType.SFIXED64:
      return (writer, value) => writer.sfixed64(value);
    case ScalarType.SINT64:
      return (writer, value) => writer.sint64(value);
    case ScalarType.UINT32:
      return (writer, value) => writer.uint32(value);
    case ScalarType.SINT32:
      return (writer, value) => writer.sint32(value);
  }
}
function compileChildWriter(field) {
  const fieldNo = field.number;
  const writeMessage = compiledWriter(field.message);
  if (field.delimitedEncoding) {
    return (writer, opts, child) => {
      writer.tag(fieldNo, WireType.StartGroup);
      writeMessage(writer, opts, child);
      writer.tag(fieldNo, WireType.EndGroup);
    };
  }
  return (writer, opts, child) => {
    writer.tag(fieldNo, WireType.LengthDelimited).fork();
    writeMessage(writer, opts, child);
    writer.join();
  };
}
function writeTypeOfScalar(type) {
  switch (type) {
    case ScalarType.BYTES:
    case ScalarType.STRING:
      return WireType.LengthDelimited;
    case ScalarType.DOUBLE:
    case ScalarType.FIXED64:
    case ScalarType.SFIXED64:
      return WireType.Bit64;
    case ScalarType.FIXED32:
    case ScalarType.SFIXED32:
    case ScalarType.FLOAT:
      return WireType.Bit32;
    default:
      return WireType.Varint;
  }
}

// src/gen/relaymesh/v1/mesh_pb.ts
var file_relaymesh_v1_mesh = /* @__PURE__ */ fileDesc("ChdyZWxheW1lc2gvdjEvbWVzaC5wcm90bxIMcmVsYXltZXNoLnYxIlMKBUVycm9yEiUKBGNvZGUYASABKA4yFy5yZWxheW1lc2gudjEuRXJyb3JDb2RlEg8KB21lc3NhZ2UYAiABKAkSEgoKcmVxdWVzdF9pZBgDIAEoBCL9AQoISWRlbnRpdHkSDQoFYWxpYXMYASABKAkSDwoHYWNjb3VudBgCIAEoCRIMCgRyb2xlGAMgASgJEg4KBmdyb3VwcxgEIAMoCRINCgVzY29wZRgFIAEoCRISCgpyZXN0cmljdGVkGAggASgIEg8KB3B1Ymxpc2gYBiADKAkSEQoJc3Vic2NyaWJlGAcgAygJEhEKCWNsaWVudF9pZBgJIAEoCRILCgNzZXEYCiABKAQSDwoHbm9kZV9pZBgLIAEoCRIRCglub2RlX25hbWUYDCABKAkSFQoNbm9kZV9sb2NhdGlvbhgNIAEoCRIRCglub2RlX2luZm8YDiABKAkiFQoEUGluZxINCgVub25jZRgBIAEoBCIVCgRQb25nEg0KBW5vbmNlGAEgASgEIp8EChNTZXJ2ZXJUb0Nvb3JkaW5hdG9yEioKCHJlZ2lzdGVyGAEgASgLMhYucmVsYXltZXNoLnYxLlJlZ2lzdGVySAASIgoEbG9hZBgCIAEoCzISLnJlbGF5bWVzaC52MS5Mb2FkSAASKgoIcmVzZXJ2ZWQYAyABKAsyFi5yZWxheW1lc2gudjEuUmVzZXJ2ZWRIABI1Cg5yZXNlcnZlX2ZhaWxlZBgEIAEoCzIbLnJlbGF5bWVzaC52MS5SZXNlcnZlRmFpbGVkSAASIgoEcG9uZxgFIAEoCzISLnJlbGF5bWVzaC52MS5Qb25nSAASMwoNbm9kZV9zZXNzaW9ucxgGIAEoCzIaLnJlbGF5bWVzaC52MS5Ob2RlU2Vzc2lvbnNIABIrCglpbmJveF9wdXQYByABKAsyFi5yZWxheW1lc2gudjEuSW5ib3hQdXRIABIvCgtpbmJveF9mZXRjaBgIIAEoCzIYLnJlbGF5bWVzaC52MS5JbmJveEZldGNoSAASLQoKaW5ib3hfZG9uZRgJIAEoCzIXLnJlbGF5bWVzaC52MS5JbmJveERvbmVIABIsCgZhbnN3ZXIYCyABKAsyGi5yZWxheW1lc2gudjEuU2VydmVyQW5zd2VySAASMwoNcmVsYXllZF9sb2dpbhgMIAEoCzIaLnJlbGF5bWVzaC52MS5SZWxheWVkTG9naW5IAEIGCgRraW5kSgQIChALIosGChNDb29yZGluYXRvclRvU2VydmVyEi4KCnJlZ2lzdGVyZWQYASABKAsyGC5yZWxheW1lc2gudjEuUmVnaXN0ZXJlZEgAEi8KC3BlZXJfam9pbmVkGAIgASgLMhgucmVsYXltZXNoLnYxLlBlZXJKb2luZWRIABIrCglwZWVyX2xlZnQYAyABKAsyFi5yZWxheW1lc2gudjEuUGVlckxlZnRIABIoCgdyZXNlcnZlGAQgASgLMhUucmVsYXltZXNoLnYxLlJlc2VydmVIABIkCgVlcnJvchgFIAEoCzITLnJlbGF5bWVzaC52MS5FcnJvckgAEiIKBHBpbmcYBiABKAsyEi5yZWxheW1lc2gudjEuUGluZ0gAEigKB3JlcGxhY2UYByABKAsyFS5yZWxheW1lc2gudjEuUmVwbGFjZUgAEi4KCHByZXNlbmNlGAggASgLMhoucmVsYXltZXNoLnYxLk5vZGVQcmVzZW5jZUgAEjEKDGluYm94X3N0b3JlZBgJIAEoCzIZLnJlbGF5bWVzaC52MS5JbmJveFN0b3JlZEgAEi8KC2luYm94X2JhdGNoGAogASgLMhgucmVsYXltZXNoLnYxLkluYm94QmF0Y2hIABIvCgtpbmJveF9udWRnZRgLIAEoCzIYLnJlbGF5bWVzaC52MS5JbmJveE51ZGdlSAASMwoNaW5ib3hfZXhwaXJlZBgMIAEoCzIaLnJlbGF5bWVzaC52MS5JbmJveEV4cGlyZWRIABIkCgVkcmFpbhgNIAEoCzITLnJlbGF5bWVzaC52MS5EcmFpbkgAEioKBXF1ZXJ5GA8gASgLMhkucmVsYXltZXNoLnYxLlNlcnZlclF1ZXJ5SAASQAoUcmVsYXllZF9sb2dpbl9hbnN3ZXIYECABKAsyIC5yZWxheW1lc2gudjEuUmVsYXllZExvZ2luQW5zd2VySAASLAoJdW5yZXNlcnZlGBEgASgLMhcucmVsYXltZXNoLnYxLlVucmVzZXJ2ZUgAQgYKBGtpbmRKBAgOEA8iKAoFRHJhaW4SDwoHZHJhaW5lZBgBIAEoCBIOCgZyZWFzb24YAiABKAki+gIKC1NlcnZlclF1ZXJ5EhIKCnJlcXVlc3RfaWQYASABKAQSIgoEa2ljaxgCIAEoCzISLnJlbGF5bWVzaC52MS5LaWNrSAASMQoMbGlzdF9jbGllbnRzGAMgASgLMhkucmVsYXltZXNoLnYxLkxpc3RDbGllbnRzSAASLgoHZGV0YWlscxgEIAEoCzIbLnJlbGF5bWVzaC52MS5TZXJ2ZXJEZXRhaWxzSAASLwoHcHVibGlzaBgFIAEoCzIcLnJlbGF5bWVzaC52MS5CYWNrZW5kUHVibGlzaEgAEioKBnRvcGljcxgGIAEoCzIYLnJlbGF5bWVzaC52MS5MaXN0VG9waWNzSAASLwoIcHJlc2VuY2UYByABKAsyGy5yZWxheW1lc2gudjEuVG9waWNQcmVzZW5jZUgAEjoKDXN1YnNjcmlwdGlvbnMYCCABKAsyIS5yZWxheW1lc2gudjEuQ2hhbmdlU3Vic2NyaXB0aW9uc0gAQgYKBGtpbmQitwIKDFNlcnZlckFuc3dlchISCgpyZXF1ZXN0X2lkGAEgASgEEhAKBmtpY2tlZBgCIAEoDUgAEisKB2NsaWVudHMYAyABKAsyGC5yZWxheW1lc2gudjEuQ2xpZW50TGlzdEgAEjMKB2RldGFpbHMYBCABKAsyIC5yZWxheW1lc2gudjEuU2VydmVyRGV0YWlsc1JlcGx5SAASMwoJcHVibGlzaGVkGAUgASgLMh4ucmVsYXltZXNoLnYxLkJhY2tlbmRQdWJsaXNoZWRIABIpCgZ0b3BpY3MYBiABKAsyFy5yZWxheW1lc2gudjEuVG9waWNMaXN0SAASEQoHY2hhbmdlZBgHIAEoDUgAEiQKBWVycm9yGA8gASgLMhMucmVsYXltZXNoLnYxLkVycm9ySABCBgoEa2luZCIlCgRLaWNrEg0KBWFsaWFzGAEgASgJEg4KBnJlYXNvbhgCIAEoCSI6CgtMaXN0Q2xpZW50cxINCgVzY29wZRgBIAEoCRINCgVhZnRlchgCIAEoCRINCgVsaW1pdBgDIAEoDSJFCgpDbGllbnRMaXN0EikKB2NsaWVudHMYASADKAsyGC5yZWxheW1lc2gudjEuQ2xpZW50SW5mbxIMCgRtb3JlGAIgASgIImwKCkNsaWVudEluZm8SDQoFYWxpYXMYASABKAkSDQoFc2NvcGUYAiABKAkSDAoEcm9sZRgDIAEoCRIRCgljbGllbnRfaWQYBCABKAkSDwoHbm9kZV9pZBgFIAEoCRIOCgZ0b3BpY3MYBiABKA0iDwoNU2VydmVyRGV0YWlscyKWAQoSU2VydmVyRGV0YWlsc1JlcGx5Eg0KBXBlZXJzGAEgAygJEkAKCGNvdW50ZXJzGAIgAygLMi4ucmVsYXltZXNoLnYxLlNlcnZlckRldGFpbHNSZXBseS5Db3VudGVyc0VudHJ5Gi8KDUNvdW50ZXJzRW50cnkSCwoDa2V5GAEgASgJEg0KBXZhbHVlGAIgASgEOgI4ASJQCg5CYWNrZW5kUHVibGlzaBINCgVzY29wZRgBIAEoCRIOCgZ0b3BpY3MYAiADKAkSDwoHcGF5bG9hZBgDIAEoDBIOCgZzZW5kZXIYBCABKAkiIwoQQmFja2VuZFB1Ymxpc2hlZBIPCgdyZWFjaGVkGAEgASgNIkkKCkxpc3RUb3BpY3MSDQoFc2NvcGUYASABKAkSDgoGcHJlZml4GAIgASgJEg0KBWFmdGVyGAMgASgJEg0KBWxpbWl0GAQgASgNIkQKCVRvcGljTGlzdBIpCgZ0b3BpY3MYASADKAsyGS5yZWxheW1lc2gudjEuQWN0aXZlVG9waWMSDAoEbW9yZRgCIAEoCCIxCgtBY3RpdmVUb3BpYxINCgV0b3BpYxgBIAEoCRITCgtzdWJzY3JpYmVycxgCIAEoDSJJChNDaGFuZ2VTdWJzY3JpcHRpb25zEg0KBWFsaWFzGAEgASgJEg4KBnRvcGljcxgCIAMoCRITCgt1bnN1YnNjcmliZRgDIAEoCCJLCg1Ub3BpY1ByZXNlbmNlEg0KBXNjb3BlGAEgASgJEg0KBXRvcGljGAIgASgJEg0KBWFmdGVyGAMgASgJEg0KBWxpbWl0GAQgASgNIqsBCghJbmJveFB1dBISCgpyZXF1ZXN0X2lkGAEgASgEEg0KBXNjb3BlGAIgASgJEg8KB3RvX25vZGUYAyABKAkSEQoJZnJvbV9ub2RlGAQgASgJEhIKCmZyb21fYWxpYXMYBSABKAkSEQoJZnJvbV9yb2xlGAYgASgJEgsKA3NlcRgHIAEoBBITCgtyZXNlbnRfZnJvbRgIIAEoCRIPCgdwYXlsb2FkGAkgASgMIlcKC0luYm94U3RvcmVkEhIKCnJlcXVlc3RfaWQYASABKAQSEAoIaW5ib3hfaWQYAiABKAQSIgoFZXJyb3IYAyABKAsyEy5yZWxheW1lc2gudjEuRXJyb3IiYQoKSW5ib3hGZXRjaBISCgpyZXF1ZXN0X2lkGAEgASgEEg0KBXNjb3BlGAIgASgJEg8KB25vZGVfaWQYAyABKAkSEAoIYWZ0ZXJfaWQYBCABKAQSDQoFbGltaXQYBSABKA0imgEKDEluYm94TWVzc2FnZRIKCgJpZBgBIAEoBBIRCglmcm9tX25vZGUYAiABKAkSEgoKZnJvbV9hbGlhcxgDIAEoCRIRCglmcm9tX3JvbGUYBCABKAkSCwoDc2VxGAUgASgEEhMKC3Jlc2VudF9mcm9tGAYgASgJEg8KB3BheWxvYWQYByABKAwSEQoJc3RvcmVkX21zGAggASgEInIKCkluYm94QmF0Y2gSEgoKcmVxdWVzdF9pZBgBIAEoBBIsCghtZXNzYWdlcxgCIAMoCzIaLnJlbGF5bWVzaC52MS5JbmJveE1lc3NhZ2USIgoFZXJyb3IYAyABKAsyEy5yZWxheW1lc2gudjEuRXJyb3IiOgoJSW5ib3hEb25lEg0KBXNjb3BlGAEgASgJEg8KB25vZGVfaWQYAiABKAkSDQoFdXBfdG8YAyABKAQiLAoKSW5ib3hOdWRnZRINCgVzY29wZRgBIAEoCRIPCgdub2RlX2lkGAIgASgJIlkKDEluYm94RXhwaXJlZBINCgVzY29wZRgBIAEoCRIRCglmcm9tX25vZGUYAiABKAkSJwoIbWVzc2FnZXMYAyADKAsyFS5yZWxheW1lc2gudjEuRXhwaXJlZCJ8CgtOb2RlU2Vzc2lvbhINCgVzY29wZRgBIAEoCRIPCgdub2RlX2lkGAIgASgJEg0KBWFsaWFzGAMgASgJEhAKCHNpbmNlX21zGAQgASgEEgwKBG5hbWUYBSABKAkSEAoIbG9jYXRpb24YBiABKAkSDAoEaW5mbxgHIAEoCSJyCgxOb2RlU2Vzc2lvbnMSDAoEZnVsbBgBIAEoCBIpCgZvcGVuZWQYAiADKAsyGS5yZWxheW1lc2gudjEuTm9kZVNlc3Npb24SKQoGY2xvc2VkGAMgAygLMhkucmVsYXltZXNoLnYxLk5vZGVTZXNzaW9uImwKCE5vZGVJbmZvEg8KB25vZGVfaWQYASABKAkSDAoEbmFtZRgCIAEoCRIQCghsb2NhdGlvbhgDIAEoCRIMCgRpbmZvGAQgASgJEhAKCHNpbmNlX21zGAUgASgEEg8KB3NlcnZlcnMYBiADKAkibgoJTm9kZUVudHJ5Eg0KBXNjb3BlGAEgASgJEiQKBG5vZGUYAiABKAsyFi5yZWxheW1lc2gudjEuTm9kZUluZm8SLAoGY2hhbmdlGAMgASgOMhwucmVsYXltZXNoLnYxLlByZXNlbmNlQ2hhbmdlIkoKDE5vZGVQcmVzZW5jZRIQCghzbmFwc2hvdBgBIAEoCBIoCgdlbnRyaWVzGAIgAygLMhcucmVsYXltZXNoLnYxLk5vZGVFbnRyeSJICgdSZXBsYWNlEg8KB2FjY291bnQYASABKAkSEQoJY2xpZW50X2lkGAIgASgJEgsKA3NlcRgDIAEoBBIMCgRyb2xlGAQgASgJIoIBCghSZWdpc3RlchIYChBwcm90b2NvbF92ZXJzaW9uGAEgASgNEhEKCXNlcnZlcl9pZBgCIAEoCRISCgpwdWJsaWNfdXJsGAMgASgJEhAKCGNhcGFjaXR5GAQgASgNEg8KB3ZlcnNpb24YBSABKAkSEgoKdW5yZXNlcnZlcxgGIAEoCCIsCgpTZXJ2ZXJJbmZvEhEKCXNlcnZlcl9pZBgBIAEoCRILCgN1cmwYAiABKAkiuwEKClJlZ2lzdGVyZWQSGAoQcHJvdG9jb2xfdmVyc2lvbhgBIAEoDRInCgVwZWVycxgCIAMoCzIYLnJlbGF5bWVzaC52MS5TZXJ2ZXJJbmZvEh0KFWhlYXJ0YmVhdF9pbnRlcnZhbF9tcxgDIAEoDRIcChRoZWFydGJlYXRfdGltZW91dF9tcxgEIAEoDRIWCg5jb29yZGluYXRvcl9pZBgFIAEoCRIVCg1yZWxheXNfbG9naW5zGAYgASgIIjQKClBlZXJKb2luZWQSJgoEcGVlchgBIAEoCzIYLnJlbGF5bWVzaC52MS5TZXJ2ZXJJbmZvIh0KCFBlZXJMZWZ0EhEKCXNlcnZlcl9pZBgBIAEoCSJPCgRMb2FkEg8KB2NsaWVudHMYASABKA0SEAoIZHJhaW5pbmcYAiABKAgSFAoMcGVuZGluZ19rZXlzGAMgASgNEg4KBnRvcGljcxgEIAEoDSJHCgdSZXNlcnZlEhIKCnJlcXVlc3RfaWQYASABKAQSKAoIaWRlbnRpdHkYAiABKAsyFi5yZWxheW1lc2gudjEuSWRlbnRpdHkiQgoIUmVzZXJ2ZWQSEgoKcmVxdWVzdF9pZBgBIAEoBBILCgNrZXkYAiABKAkSFQoNZXhwaXJlc19pbl9tcxgDIAEoDSJHCg1SZXNlcnZlRmFpbGVkEhIKCnJlcXVlc3RfaWQYASABKAQSIgoFZXJyb3IYAiABKAsyEy5yZWxheW1lc2gudjEuRXJyb3IiLAoJVW5yZXNlcnZlEhIKCnJlcXVlc3RfaWQYASABKAQSCwoDa2V5GAIgASgJIn8KDFJlbGF5ZWRMb2dpbhISCgpyZXF1ZXN0X2lkGAEgASgEEiIKBWxvZ2luGAIgASgLMhMucmVsYXltZXNoLnYxLkxvZ2luEgwKBGZyb20YAyABKAkSEQoJd2l0aGluX21zGAQgASgNEhYKDnRha2VzX2lkZW50aXR5GAUgASgIIqEBChJSZWxheWVkTG9naW5BbnN3ZXISEgoKcmVxdWVzdF9pZBgBIAEoBBIpCgVvZmZlchgCIAEoCzIaLnJlbGF5bWVzaC52MS5Db25uZWN0T2ZmZXISIgoFZXJyb3IYAyABKAsyEy5yZWxheW1lc2gudjEuRXJyb3ISKAoIaWRlbnRpdHkYBCABKAsyFi5yZWxheW1lc2gudjEuSWRlbnRpdHkitgIKE0NsaWVudFRvQ29vcmRpbmF0b3ISJAoFaGVsbG8YASABKAsyEy5yZWxheW1lc2gudjEuSGVsbG9IABIoCgdjb25uZWN0GAIgASgLMhUucmVsYXltZXNoLnYxLkNvbm5lY3RIABIiCgRwaW5nGAMgASgLMhIucmVsYXltZXNoLnYxLlBpbmdIABI9ChJjaGFsbGVuZ2VfcmVzcG9uc2UYBCABKAsyHy5yZWxheW1lc2gudjEuQ2hhbGxlbmdlUmVzcG9uc2VIABIzCg1yZWdpc3Rlcl9ub2RlGAUgASgLMhoucmVsYXltZXNoLnYxLlJlZ2lzdGVyTm9kZUgAEi8KC3VwZGF0ZV9ub2RlGAYgASgLMhgucmVsYXltZXNoLnYxLlVwZGF0ZU5vZGVIAEIGCgRraW5kItgCChNDb29yZGluYXRvclRvQ2xpZW50EigKB3dlbGNvbWUYASABKAsyFS5yZWxheW1lc2gudjEuV2VsY29tZUgAEisKBW9mZmVyGAIgASgLMhoucmVsYXltZXNoLnYxLkNvbm5lY3RPZmZlckgAEiQKBWVycm9yGAMgASgLMhMucmVsYXltZXNoLnYxLkVycm9ySAASIgoEcG9uZxgEIAEoCzISLnJlbGF5bWVzaC52MS5Qb25nSAASLAoJY2hhbGxlbmdlGAUgASgLMhcucmVsYXltZXNoLnYxLkNoYWxsZW5nZUgAEjcKD25vZGVfcmVnaXN0ZXJlZBgGIAEoCzIcLnJlbGF5bWVzaC52MS5Ob2RlUmVnaXN0ZXJlZEgAEjEKDG5vZGVfdXBkYXRlZBgHIAEoCzIZLnJlbGF5bWVzaC52MS5Ob2RlVXBkYXRlZEgAQgYKBGtpbmQiygEKC0NyZWRlbnRpYWxzEiwKCWFub255bW91cxgBIAEoCzIXLnJlbGF5bWVzaC52MS5Bbm9ueW1vdXNIABIvCgthY2Nlc3NfY29kZRgCIAEoCzIYLnJlbGF5bWVzaC52MS5BY2Nlc3NDb2RlSAASJQoDa2V5GAMgASgLMhYucmVsYXltZXNoLnYxLktleUxvZ2luSAASLQoKbm9kZV90b2tlbhgEIAEoCzIXLnJlbGF5bWVzaC52MS5Ob2RlVG9rZW5IAEIGCgRraW5kIhoKCU5vZGVUb2tlbhINCgV0b2tlbhgBIAEoCSJ1CghLZXlMb2dpbhIPCgdhY2NvdW50GAEgASgJEhIKCnB1YmxpY19rZXkYAiABKAwSDAoEcm9sZRgDIAEoCRINCgVncm91cBgEIAEoCRIUCgxjaGFsbGVuZ2VfaWQYBSABKAkSEQoJc2lnbmF0dXJlGAYgASgMIhoKCUNoYWxsZW5nZRINCgVub25jZRgBIAEoDCImChFDaGFsbGVuZ2VSZXNwb25zZRIRCglzaWduYXR1cmUYASABKAwiCwoJQW5vbnltb3VzIkgKCkFjY2Vzc0NvZGUSDwoHYWNjb3VudBgBIAEoCRIMCgRjb2RlGAIgASgJEgwKBHJvbGUYAyABKAkSDQoFZ3JvdXAYBCABKAkiZAoFSGVsbG8SGAoQcHJvdG9jb2xfdmVyc2lvbhgBIAEoDRIuCgtjcmVkZW50aWFscxgCIAEoCzIZLnJlbGF5bWVzaC52MS5DcmVkZW50aWFscxIRCgljbGllbnRfaWQYAyABKAkiqwEKB1dlbGNvbWUSGAoQcHJvdG9jb2xfdmVyc2lvbhgBIAEoDRINCgVhbGlhcxgCIAEoCRIpCgdzZXJ2ZXJzGAMgAygLMhgucmVsYXltZXNoLnYxLlNlcnZlckluZm8SHQoVaGVhcnRiZWF0X2ludGVydmFsX21zGAQgASgNEhwKFGhlYXJ0YmVhdF90aW1lb3V0X21zGAUgASgNEg8KB25vZGVfaWQYBiABKAkiPAoMUmVnaXN0ZXJOb2RlEgwKBG5hbWUYASABKAkSEAoIbG9jYXRpb24YAiABKAkSDAoEaW5mbxgDIAEoCSIwCg5Ob2RlUmVnaXN0ZXJlZBIPCgdub2RlX2lkGAEgASgJEg0KBXRva2VuGAIgASgJIjoKClVwZGF0ZU5vZGUSDAoEbmFtZRgBIAEoCRIQCghsb2NhdGlvbhgCIAEoCRIMCgRpbmZvGAMgASgJIh4KC05vZGVVcGRhdGVkEg8KB25vZGVfaWQYASABKAkiRAoHQ29ubmVjdBIYChBwcmVmZXJyZWRfc2VydmVyGAEgASgJEg8KB2V4Y2x1ZGUYAiADKAkSDgoGbW92aW5nGAMgASgIIlIKDENvbm5lY3RPZmZlchIRCglzZXJ2ZXJfaWQYASABKAkSCwoDdXJsGAIgASgJEgsKA2tleRgDIAEoCRIVCg1leHBpcmVzX2luX21zGAQgASgNIrkECg5DbGllbnRUb1NlcnZlchImCgZhdHRhY2gYASABKAsyFC5yZWxheW1lc2gudjEuQXR0YWNoSAASLAoJc3Vic2NyaWJlGAIgASgLMhcucmVsYXltZXNoLnYxLlN1YnNjcmliZUgAEjAKC3Vuc3Vic2NyaWJlGAMgASgLMhkucmVsYXltZXNoLnYxLlVuc3Vic2NyaWJlSAASKAoHcHVibGlzaBgEIAEoCzIVLnJlbGF5bWVzaC52MS5QdWJsaXNoSAASIgoEcGluZxgFIAEoCzISLnJlbGF5bWVzaC52MS5QaW5nSAASIgoEc2VuZBgGIAEoCzISLnJlbGF5bWVzaC52MS5TZW5kSAASJgoGc2lnbmFsGAcgASgLMhQucmVsYXltZXNoLnYxLlNpZ25hbEgAEi0KCmxpc3Rfbm9kZXMYCCABKAsyFy5yZWxheW1lc2gudjEuTGlzdE5vZGVzSAASKwoJaW5ib3hfYWNrGAkgASgLMhYucmVsYXltZXNoLnYxLkluYm94QWNrSAASJAoFbGVhdmUYCiABKAsyEy5yZWxheW1lc2gudjEuTGVhdmVIABIoCgdoaXN0b3J5GAsgASgLMhUucmVsYXltZXNoLnYxLkhpc3RvcnlIABIrCgViYXRjaBgMIAEoCzIaLnJlbGF5bWVzaC52MS5QdWJsaXNoQmF0Y2hIABIkCgVsb2dpbhgNIAEoCzITLnJlbGF5bWVzaC52MS5Mb2dpbkgAQgYKBGtpbmQinwEKBUxvZ2luEhgKEHByb3RvY29sX3ZlcnNpb24YASABKA0SLgoLY3JlZGVudGlhbHMYAiABKAsyGS5yZWxheW1lc2gudjEuQ3JlZGVudGlhbHMSEQoJY2xpZW50X2lkGAMgASgJEg8KB2V4Y2x1ZGUYBCADKAkSDgoGbW92aW5nGAUgASgIEhgKEHByZWZlcnJlZF9zZXJ2ZXIYBiABKAkiOAoMUHVibGlzaEJhdGNoEigKCXB1Ymxpc2hlcxgEIAMoCzIVLnJlbGF5bWVzaC52MS5QdWJsaXNoInkKB0hpc3RvcnkSEgoKcmVxdWVzdF9pZBgBIAEoBBINCgV0b3BpYxgCIAEoCRIMCgRsYXN0GAMgASgNEisKBXNpbmNlGAQgAygLMhwucmVsYXltZXNoLnYxLlN0cmVhbVBvc2l0aW9uEhAKCHNpbmNlX21zGAUgASgEIjAKDlN0cmVhbVBvc2l0aW9uEg4KBnN0cmVhbRgBIAEoBBIOCgZvZmZzZXQYAiABKAQiVwoHUmVjb3ZlchINCgV0b3BpYxgBIAEoCRIrCgVzaW5jZRgCIAMoCzIcLnJlbGF5bWVzaC52MS5TdHJlYW1Qb3NpdGlvbhIQCghzaW5jZV9tcxgDIAEoBCIHCgVMZWF2ZSIZCghJbmJveEFjaxINCgV1cF90bxgBIAEoBCKIBgoOU2VydmVyVG9DbGllbnQSJAoFcmVhZHkYASABKAsyEy5yZWxheW1lc2gudjEuUmVhZHlIABIoCgdtZXNzYWdlGAIgASgLMhUucmVsYXltZXNoLnYxLk1lc3NhZ2VIABIoCgdkcm9wcGVkGAMgASgLMhUucmVsYXltZXNoLnYxLkRyb3BwZWRIABIkCgVlcnJvchgEIAEoCzITLnJlbGF5bWVzaC52MS5FcnJvckgAEiIKBHBvbmcYBSABKAsyEi5yZWxheW1lc2gudjEuUG9uZ0gAEiAKA2FjaxgGIAEoCzIRLnJlbGF5bWVzaC52MS5BY2tIABIsCglwdWJsaXNoZWQYByABKAsyFy5yZWxheW1lc2gudjEuUHVibGlzaGVkSAASNAoNdW5kZWxpdmVyYWJsZRgIIAEoCzIbLnJlbGF5bWVzaC52MS5VbmRlbGl2ZXJhYmxlSAASKwoJbm9kZV9saXN0GAkgASgLMhYucmVsYXltZXNoLnYxLk5vZGVMaXN0SAASKgoIYWNjZXB0ZWQYCiABKAsyFi5yZWxheW1lc2gudjEuQWNjZXB0ZWRIABIoCgdleHBpcmVkGAsgASgLMhUucmVsYXltZXNoLnYxLkV4cGlyZWRIABIsCglyZWNvbm5lY3QYDCABKAsyFy5yZWxheW1lc2gudjEuUmVjb25uZWN0SAASIgoEbGVmdBgNIAEoCzISLnJlbGF5bWVzaC52MS5MZWZ0SAASQwoVc3Vic2NyaXB0aW9uc19jaGFuZ2VkGA4gASgLMiIucmVsYXltZXNoLnYxLlN1YnNjcmlwdGlvbnNDaGFuZ2VkSAASLQoHaGlzdG9yeRgPIAEoCzIaLnJlbGF5bWVzaC52MS5IaXN0b3J5QmF0Y2hIABIrCgViYXRjaBgQIAEoCzIaLnJlbGF5bWVzaC52MS5NZXNzYWdlQmF0Y2hIABIuCghyZWRpcmVjdBgRIAEoCzIaLnJlbGF5bWVzaC52MS5Db25uZWN0T2ZmZXJIAEIGCgRraW5kIjcKDE1lc3NhZ2VCYXRjaBInCghtZXNzYWdlcxgCIAMoCzIVLnJlbGF5bWVzaC52MS5NZXNzYWdlIrkBCgxIaXN0b3J5QmF0Y2gSEgoKcmVxdWVzdF9pZBgBIAEoBBInCghtZXNzYWdlcxgCIAMoCzIVLnJlbGF5bWVzaC52MS5NZXNzYWdlEg0KBXRvcGljGAMgASgJEhAKCHJlY292ZXJ5GAQgASgIEgwKBGRvbmUYBSABKAgSCwoDZ2FwGAYgASgIEhcKD21pc3NlZF9hdF9sZWFzdBgHIAEoBBIXCg91bmtub3duX3N0cmVhbXMYCCADKAQiNgoUU3Vic2NyaXB0aW9uc0NoYW5nZWQSDQoFYWRkZWQYASADKAkSDwoHcmVtb3ZlZBgCIAMoCSIGCgRMZWZ0IhsKCVJlY29ubmVjdBIOCgZyZWFzb24YASABKAkiOgoIQWNjZXB0ZWQSCwoDc2VxGAEgASgEEg8KB3RvX25vZGUYAiABKAkSEAoIaW5ib3hfaWQYAyABKAQiXwoHRXhwaXJlZBIPCgd0b19ub2RlGAEgASgJEhAKCGluYm94X2lkGAIgASgEEgsKA3NlcRgDIAEoBBIRCglwdWJsaXNoZXIYBCABKAkSEQoJc3RvcmVkX21zGAUgASgEIj4KCUxpc3ROb2RlcxISCgpyZXF1ZXN0X2lkGAEgASgEEg0KBWxpbWl0GAIgASgNEg4KBmZpbHRlchgDIAEoCSJUCghOb2RlTGlzdBISCgpyZXF1ZXN0X2lkGAEgASgEEiUKBW5vZGVzGAIgAygLMhYucmVsYXltZXNoLnYxLk5vZGVJbmZvEg0KBXRvdGFsGAMgASgEImMKDVByZXNlbmNlRXZlbnQSLAoGY2hhbmdlGAEgASgOMhwucmVsYXltZXNoLnYxLlByZXNlbmNlQ2hhbmdlEiQKBG5vZGUYAiABKAsyFi5yZWxheW1lc2gudjEuTm9kZUluZm8iIgoGQXR0YWNoEhgKEHByb3RvY29sX3ZlcnNpb24YASABKA0i8gEKBVJlYWR5EhgKEHByb3RvY29sX3ZlcnNpb24YASABKA0SDQoFYWxpYXMYAiABKAkSEQoJc2VydmVyX2lkGAMgASgJEh0KFWhlYXJ0YmVhdF9pbnRlcnZhbF9tcxgEIAEoDRIcChRoZWFydGJlYXRfdGltZW91dF9tcxgFIAEoDRIPCgdub2RlX2lkGAYgASgJEhcKD21heF9mcmFtZV9ieXRlcxgHIAEoDRIbChNtYXhfYmF0Y2hfcHVibGlzaGVzGAggASgNEikKB3NlcnZlcnMYCSADKAsyGC5yZWxheW1lc2gudjEuU2VydmVySW5mbyJXCglTdWJzY3JpYmUSEgoKcmVxdWVzdF9pZBgBIAEoBBIOCgZ0b3BpY3MYAiADKAkSJgoHcmVjb3ZlchgDIAMoCzIVLnJlbGF5bWVzaC52MS5SZWNvdmVyIjEKC1Vuc3Vic2NyaWJlEhIKCnJlcXVlc3RfaWQYASABKAQSDgoGdG9waWNzGAIgAygJIkoKA0FjaxISCgpyZXF1ZXN0X2lkGAEgASgEEg8KB3BlbmRpbmcYAiADKAkSDQoFYXRfbXMYAyABKAQSDwoHaGlzdG9yeRgEIAMoCSJLCgdQdWJsaXNoEg0KBXRvcGljGAEgASgJEg8KB3BheWxvYWQYAiABKAwSCwoDc2VxGAMgASgEEhMKC3Jlc2VudF9mcm9tGAQgASgJIhoKCVB1Ymxpc2hlZBINCgV1cF90bxgBIAEoBCJKCgRTZW5kEg8KB3RvX25vZGUYASABKAkSDwoHcGF5bG9hZBgCIAEoDBILCgNzZXEYAyABKAQSEwoLcmVzZW50X2Zyb20YBCABKAkiXwoGU2lnbmFsEg8KB3RvX25vZGUYASABKAkSJgoEa2luZBgCIAEoDjIYLnJlbGF5bWVzaC52MS5TaWduYWxLaW5kEg8KB3BheWxvYWQYAyABKAwSCwoDc2VxGAQgASgEImcKDVVuZGVsaXZlcmFibGUSCwoDc2VxGAEgASgEEicKBnJlYXNvbhgCIAEoDjIXLnJlbGF5bWVzaC52MS5FcnJvckNvZGUSDwoHdG9fbm9kZRgDIAEoCRIPCgdtZXNzYWdlGAQgASgJIvcBCgdNZXNzYWdlEg0KBXRvcGljGAEgASgJEhIKCmZyb21fYWxpYXMYAiABKAkSDwoHcGF5bG9hZBgDIAEoDBIRCglmcm9tX3JvbGUYBCABKAkSCwoDc2VxGAUgASgEEhMKC3Jlc2VudF9mcm9tGAYgASgJEhEKCWZyb21fbm9kZRgHIAEoCRIoCgZzaWduYWwYCCABKA4yGC5yZWxheW1lc2gudjEuU2lnbmFsS2luZBIQCghpbmJveF9pZBgJIAEoBBIOCgZzdHJlYW0YCiABKAQSDgoGb2Zmc2V0GAsgASgEEhQKDHB1Ymxpc2hlZF9tcxgMIAEoBCIqCgdEcm9wcGVkEg0KBWNvdW50GAEgASgEEhAKCHVwc3RyZWFtGAIgASgEIoEECgtQZWVyTWVzc2FnZRIoCgVoZWxsbxgBIAEoCzIXLnJlbGF5bWVzaC52MS5QZWVySGVsbG9IABIqCghpbnRlcmVzdBgCIAEoCzIWLnJlbGF5bWVzaC52MS5JbnRlcmVzdEgAEjEKDGludGVyZXN0X2FjaxgDIAEoCzIZLnJlbGF5bWVzaC52MS5JbnRlcmVzdEFja0gAEigKB2ZvcndhcmQYBCABKAsyFS5yZWxheW1lc2gudjEuRm9yd2FyZEgAEjcKD2ZvcndhcmRfZHJvcHBlZBgFIAEoCzIcLnJlbGF5bWVzaC52MS5Gb3J3YXJkRHJvcHBlZEgAEiIKBHBpbmcYBiABKAsyEi5yZWxheW1lc2gudjEuUGluZ0gAEiIKBHBvbmcYByABKAsyEi5yZWxheW1lc2gudjEuUG9uZ0gAEiQKBWVycm9yGAggASgLMhMucmVsYXltZXNoLnYxLkVycm9ySAASJAoFZmx1c2gYCSABKAsyEy5yZWxheW1lc2gudjEuRmx1c2hIABIzCg1oaXN0b3J5X3F1ZXJ5GAogASgLMhoucmVsYXltZXNoLnYxLkhpc3RvcnlRdWVyeUgAEjUKDmhpc3RvcnlfYW5zd2VyGAsgASgLMhsucmVsYXltZXNoLnYxLkhpc3RvcnlBbnN3ZXJIAEIGCgRraW5kIqUBCgxIaXN0b3J5UXVlcnkSEgoKcmVxdWVzdF9pZBgBIAEoBBIPCgdhY2NvdW50GAIgASgJEg0KBXRvcGljGAMgASgJEgwKBGxhc3QYBCABKA0SKwoFc2luY2UYBSADKAsyHC5yZWxheW1lc2gudjEuU3RyZWFtUG9zaXRpb24SEAoIc2luY2VfbXMYBiABKAQSFAoMbWF4X21lc3NhZ2VzGAcgASgNIoIBCg1IaXN0b3J5QW5zd2VyEhIKCnJlcXVlc3RfaWQYASABKAQSJwoIbWVzc2FnZXMYAiADKAsyFS5yZWxheW1lc2gudjEuTWVzc2FnZRImCgRoZWxkGAMgAygLMhgucmVsYXltZXNoLnYxLlN0cmVhbUhlbGQSDAoEbW9yZRgEIAEoCCJJCgpTdHJlYW1IZWxkEg4KBnN0cmVhbRgBIAEoBBINCgVmaXJzdBgCIAEoBBIMCgRsYXN0GAMgASgEEg4KBm9yaWdpbhgEIAEoCCIWCgVGbHVzaBINCgVub25jZRgBIAEoBCJ+CglQZWVySGVsbG8SGAoQcHJvdG9jb2xfdmVyc2lvbhgBIAEoDRIRCglzZXJ2ZXJfaWQYAiABKAkSEgoKbGlua19ub25jZRgDIAEoBBIVCg1wcmV2aW91c19saW5rGAQgASgEEhkKEXByZXZpb3VzX3JlY2VpdmVkGAUgASgEIioKCFRvcGljUmVmEg8KB2FjY291bnQYASABKAkSDQoFdG9waWMYAiABKAkicgoISW50ZXJlc3QSCwoDc2VxGAEgASgEEgwKBGZ1bGwYAiABKAgSIwoDYWRkGAMgAygLMhYucmVsYXltZXNoLnYxLlRvcGljUmVmEiYKBnJlbW92ZRgEIAMoCzIWLnJlbGF5bWVzaC52MS5Ub3BpY1JlZiIaCgtJbnRlcmVzdEFjaxILCgNzZXEYASABKAQi9gEKB0ZvcndhcmQSDwoHYWNjb3VudBgBIAEoCRINCgV0b3BpYxgCIAEoCRISCgpmcm9tX2FsaWFzGAMgASgJEg8KB3BheWxvYWQYBCABKAwSEQoJZnJvbV9yb2xlGAUgASgJEgsKA3NlcRgGIAEoBBITCgtyZXNlbnRfZnJvbRgHIAEoCRIRCglmcm9tX25vZGUYCCABKAkSKAoGc2lnbmFsGAkgASgOMhgucmVsYXltZXNoLnYxLlNpZ25hbEtpbmQSDgoGc3RyZWFtGAogASgEEg4KBm9mZnNldBgLIAEoBBIUCgxwdWJsaXNoZWRfbXMYDCABKAQiVwoORm9yd2FyZERyb3BwZWQSDQoFY291bnQYASABKAQSKAoGdG9waWNzGAIgAygLMhgucmVsYXltZXNoLnYxLlRvcGljQ291bnQSDAoEbGluaxgDIAEoBCI7CgpUb3BpY0NvdW50Eg8KB2FjY291bnQYASABKAkSDQoFdG9waWMYAiABKAkSDQoFY291bnQYAyABKAQqqQQKCUVycm9yQ29kZRIaChZFUlJPUl9DT0RFX1VOU1BFQ0lGSUVEEAASDQoJQkFEX0ZSQU1FEAESFwoTVU5TVVBQT1JURURfVkVSU0lPThACEhMKD1VOQVVUSEVOVElDQVRFRBADEg0KCUZPUkJJRERFThAEEg8KC0tFWV9JTlZBTElEEAUSFwoTTk9fU0VSVkVSX0FWQUlMQUJMRRAGEg8KC1NFUlZFUl9GVUxMEAcSEgoOTElNSVRfRVhDRUVERUQQCBIRCg1TTE9XX0NPTlNVTUVSEAkSDAoISU5URVJOQUwQChIRCg1JTlZBTElEX1RPUElDEAsSFgoSVU5FWFBFQ1RFRF9NRVNTQUdFEAwSFQoRSEVBUlRCRUFUX1RJTUVPVVQQDRIRCg1TSFVUVElOR19ET1dOEA4SDAoIUkVQTEFDRUQQDxITCg9VTktOT1dOX0FDQ09VTlQQEBITCg9CQURfQ1JFREVOVElBTFMQERIUChBBQ0NPVU5UX0RJU0FCTEVEEBISFgoSUk9MRV9OT1RfUEVSTUlUVEVEEBMSEAoMUkFURV9MSU1JVEVEEBQSDQoJTk9UX0ZPVU5EEBUSFgoSTUVUSE9EX05PVF9BTExPV0VEEBYSEAoMVU5LTk9XTl9OT0RFEBcSEQoNTk9UX0NPTk5FQ1RFRBAYEg4KCklOQk9YX0ZVTEwQGRIPCgtVTkFWQUlMQUJMRRAaEgoKBktJQ0tFRBAbKocBCg5QcmVzZW5jZUNoYW5nZRIfChtQUkVTRU5DRV9DSEFOR0VfVU5TUEVDSUZJRUQQABIaChZQUkVTRU5DRV9DSEFOR0VfT05MSU5FEAESGwoXUFJFU0VOQ0VfQ0hBTkdFX09GRkxJTkUQAhIbChdQUkVTRU5DRV9DSEFOR0VfVVBEQVRFRBADKqUBCgpTaWduYWxLaW5kEhsKF1NJR05BTF9LSU5EX1VOU1BFQ0lGSUVEEAASFAoQU0lHTkFMX0tJTkRfSU5JVBABEhUKEVNJR05BTF9LSU5EX09GRkVSEAISFgoSU0lHTkFMX0tJTkRfQU5TV0VSEAMSHQoZU0lHTkFMX0tJTkRfSUNFX0NBTkRJREFURRAEEhYKElNJR05BTF9LSU5EX0NVU1RPTRAFYgZwcm90bzM");
var ClientToServerSchema = /* @__PURE__ */ messageDesc(file_relaymesh_v1_mesh, 65);
var ServerToClientSchema = /* @__PURE__ */ messageDesc(file_relaymesh_v1_mesh, 73);
var PresenceEventSchema = /* @__PURE__ */ messageDesc(file_relaymesh_v1_mesh, 83);
var ErrorCode = /* @__PURE__ */ ((ErrorCode2) => {
  ErrorCode2[ErrorCode2["ERROR_CODE_UNSPECIFIED"] = 0] = "ERROR_CODE_UNSPECIFIED";
  ErrorCode2[ErrorCode2["BAD_FRAME"] = 1] = "BAD_FRAME";
  ErrorCode2[ErrorCode2["UNSUPPORTED_VERSION"] = 2] = "UNSUPPORTED_VERSION";
  ErrorCode2[ErrorCode2["UNAUTHENTICATED"] = 3] = "UNAUTHENTICATED";
  ErrorCode2[ErrorCode2["FORBIDDEN"] = 4] = "FORBIDDEN";
  ErrorCode2[ErrorCode2["KEY_INVALID"] = 5] = "KEY_INVALID";
  ErrorCode2[ErrorCode2["NO_SERVER_AVAILABLE"] = 6] = "NO_SERVER_AVAILABLE";
  ErrorCode2[ErrorCode2["SERVER_FULL"] = 7] = "SERVER_FULL";
  ErrorCode2[ErrorCode2["LIMIT_EXCEEDED"] = 8] = "LIMIT_EXCEEDED";
  ErrorCode2[ErrorCode2["SLOW_CONSUMER"] = 9] = "SLOW_CONSUMER";
  ErrorCode2[ErrorCode2["INTERNAL"] = 10] = "INTERNAL";
  ErrorCode2[ErrorCode2["INVALID_TOPIC"] = 11] = "INVALID_TOPIC";
  ErrorCode2[ErrorCode2["UNEXPECTED_MESSAGE"] = 12] = "UNEXPECTED_MESSAGE";
  ErrorCode2[ErrorCode2["HEARTBEAT_TIMEOUT"] = 13] = "HEARTBEAT_TIMEOUT";
  ErrorCode2[ErrorCode2["SHUTTING_DOWN"] = 14] = "SHUTTING_DOWN";
  ErrorCode2[ErrorCode2["REPLACED"] = 15] = "REPLACED";
  ErrorCode2[ErrorCode2["UNKNOWN_ACCOUNT"] = 16] = "UNKNOWN_ACCOUNT";
  ErrorCode2[ErrorCode2["BAD_CREDENTIALS"] = 17] = "BAD_CREDENTIALS";
  ErrorCode2[ErrorCode2["ACCOUNT_DISABLED"] = 18] = "ACCOUNT_DISABLED";
  ErrorCode2[ErrorCode2["ROLE_NOT_PERMITTED"] = 19] = "ROLE_NOT_PERMITTED";
  ErrorCode2[ErrorCode2["RATE_LIMITED"] = 20] = "RATE_LIMITED";
  ErrorCode2[ErrorCode2["NOT_FOUND"] = 21] = "NOT_FOUND";
  ErrorCode2[ErrorCode2["METHOD_NOT_ALLOWED"] = 22] = "METHOD_NOT_ALLOWED";
  ErrorCode2[ErrorCode2["UNKNOWN_NODE"] = 23] = "UNKNOWN_NODE";
  ErrorCode2[ErrorCode2["NOT_CONNECTED"] = 24] = "NOT_CONNECTED";
  ErrorCode2[ErrorCode2["INBOX_FULL"] = 25] = "INBOX_FULL";
  ErrorCode2[ErrorCode2["UNAVAILABLE"] = 26] = "UNAVAILABLE";
  ErrorCode2[ErrorCode2["KICKED"] = 27] = "KICKED";
  return ErrorCode2;
})(ErrorCode || {});
var PresenceChange = /* @__PURE__ */ ((PresenceChange2) => {
  PresenceChange2[PresenceChange2["UNSPECIFIED"] = 0] = "UNSPECIFIED";
  PresenceChange2[PresenceChange2["ONLINE"] = 1] = "ONLINE";
  PresenceChange2[PresenceChange2["OFFLINE"] = 2] = "OFFLINE";
  PresenceChange2[PresenceChange2["UPDATED"] = 3] = "UPDATED";
  return PresenceChange2;
})(PresenceChange || {});
var SignalKind = /* @__PURE__ */ ((SignalKind2) => {
  SignalKind2[SignalKind2["UNSPECIFIED"] = 0] = "UNSPECIFIED";
  SignalKind2[SignalKind2["INIT"] = 1] = "INIT";
  SignalKind2[SignalKind2["OFFER"] = 2] = "OFFER";
  SignalKind2[SignalKind2["ANSWER"] = 3] = "ANSWER";
  SignalKind2[SignalKind2["ICE_CANDIDATE"] = 4] = "ICE_CANDIDATE";
  SignalKind2[SignalKind2["CUSTOM"] = 5] = "CUSTOM";
  return SignalKind2;
})(SignalKind || {});

// src/errors.ts
var RelaymeshError = class _RelaymeshError extends Error {
  /** `FORBIDDEN`, `KEY_INVALID`, `BAD_CREDENTIALS`, ... or a client-side name. */
  code;
  /** The HTTP status of a refused request, when there was one. */
  status;
  constructor(code, message, status) {
    super(message);
    this.name = "RelaymeshError";
    this.code = code;
    this.status = status;
  }
  /** From an `Error` the server sent (`Error.code` is a number on the wire). */
  static fromWire(code, message) {
    const name = ErrorCode[code] ?? "ERROR_CODE_UNSPECIFIED";
    return new _RelaymeshError(name, message);
  }
  /** From a `{code, message}` JSON body (the coordinator's and comm server's HTTP errors). */
  static fromJson(body, status) {
    if (body !== null && typeof body === "object") {
      const { code, message } = body;
      if (typeof code === "string" && code in ErrorCode) {
        return new _RelaymeshError(
          code,
          typeof message === "string" ? message : code,
          status
        );
      }
    }
    return new _RelaymeshError("BAD_ANSWER", `answered ${status} without an error code`, status);
  }
};

// src/wire.ts
var MESSAGE_TAG = 18;
var BATCH_KEY = [130, 1];
var WireError = class extends Error {
};
var utf8 = new TextDecoder("utf-8", { fatal: true });
var StringCache = class {
  #bytes = new Uint8Array(0);
  #text = "";
  get(buf, start, end) {
    const len = end - start;
    if (len === 0) return "";
    const cached = this.#bytes;
    if (cached.length === len) {
      let same = true;
      for (let i = 0; i < len; i++) {
        if (cached[i] !== buf[start + i]) {
          same = false;
          break;
        }
      }
      if (same) return this.#text;
    }
    const text = utf8.decode(buf.subarray(start, end));
    this.#bytes = buf.slice(start, end);
    this.#text = text;
    return text;
  }
};
var MessageReader = class {
  #topic = new StringCache();
  #alias = new StringCache();
  #role = new StringCache();
  #other = new StringCache();
  /** The message in `buf`, `undefined` when `buf` is another kind of frame; throws
   * {@link WireError} when it is a message frame that does not decode. */
  read(buf) {
    if (buf.length === 0 || buf[0] !== MESSAGE_TAG) return void 0;
    const at = { i: 1 };
    const len = varintNumber(buf, at);
    const end = at.i + len;
    if (end !== buf.length) {
      return void 0;
    }
    return this.#message(buf, at, end);
  }
  /** The messages of the batch in `buf`, in order; `undefined` when `buf` is another kind of
   * frame (or a batch with more than messages in it, left to the generic decoder); throws
   * {@link WireError} when it is a batch that does not decode, before handing any on. */
  readBatch(buf) {
    if (buf.length < 3 || buf[0] !== BATCH_KEY[0] || buf[1] !== BATCH_KEY[1]) return void 0;
    const at = { i: 2 };
    const len = varintNumber(buf, at);
    const end = at.i + len;
    if (end !== buf.length) return void 0;
    const messages = [];
    while (at.i < end) {
      if (buf[at.i] !== MESSAGE_TAG) return void 0;
      at.i++;
      const n = varintNumber(buf, at);
      const stop = at.i + n;
      if (stop > end) throw new WireError("a message runs past the batch");
      messages.push(this.#message(buf, at, stop));
      at.i = stop;
    }
    return messages;
  }
  /** The `Message` in `buf` from `at.i` to `end`. */
  #message(buf, at, end) {
    const m = {
      topic: "",
      fromAlias: "",
      payload: EMPTY,
      fromRole: "",
      seq: 0n,
      resentFrom: "",
      fromNode: "",
      signal: 0,
      inboxId: 0n,
      stream: 0n,
      offset: 0n,
      publishedMs: 0n
    };
    while (at.i < end) {
      const key = varintNumber(buf, at);
      const field = key >>> 3;
      const wire = key & 7;
      if (wire === 2) {
        const n = varintNumber(buf, at);
        const start = at.i;
        const stop = start + n;
        if (stop > end) throw new WireError("a field runs past the message");
        at.i = stop;
        switch (field) {
          case 1:
            m.topic = this.#topic.get(buf, start, stop);
            break;
          case 2:
            m.fromAlias = this.#alias.get(buf, start, stop);
            break;
          case 3:
            m.payload = buf.subarray(start, stop);
            break;
          case 4:
            m.fromRole = this.#role.get(buf, start, stop);
            break;
          case 6:
            m.resentFrom = this.#other.get(buf, start, stop);
            break;
          case 7:
            m.fromNode = this.#other.get(buf, start, stop);
            break;
          default:
            break;
        }
      } else if (wire === 0) {
        const v = varintBig(buf, at);
        switch (field) {
          case 5:
            m.seq = v;
            break;
          case 8:
            m.signal = Number(BigInt.asIntN(32, v));
            break;
          case 9:
            m.inboxId = v;
            break;
          case 10:
            m.stream = v;
            break;
          case 11:
            m.offset = v;
            break;
          case 12:
            m.publishedMs = v;
            break;
          default:
            break;
        }
      } else if (wire === 1) {
        at.i += 8;
      } else if (wire === 5) {
        at.i += 4;
      } else {
        throw new WireError(`wire type ${wire} in a message`);
      }
      if (at.i > end) throw new WireError("a field runs past the message");
    }
    return m;
  }
};
var EMPTY = new Uint8Array(0);
function varintNumber(buf, at) {
  let value = 0;
  let scale = 1;
  for (let n = 0; n < 8; n++) {
    if (at.i >= buf.length) throw new WireError("a varint runs past the frame");
    const b = buf[at.i++];
    value += (b & 127) * scale;
    if (b < 128) return value;
    scale *= 128;
  }
  throw new WireError("a length or key too large");
}
function varintBig(buf, at) {
  let value = 0;
  let scale = 1;
  for (let n = 0; n < 7; n++) {
    if (at.i >= buf.length) throw new WireError("a varint runs past the frame");
    const b = buf[at.i++];
    value += (b & 127) * scale;
    if (b < 128) return BigInt(value);
    scale *= 128;
  }
  let big = BigInt(value);
  let shift = 49n;
  for (let n = 7; n < 10; n++) {
    if (at.i >= buf.length) throw new WireError("a varint runs past the frame");
    const b = buf[at.i++];
    big |= BigInt(b & 127) << shift;
    if (b < 128) return BigInt.asUintN(64, big);
    shift += 7n;
  }
  throw new WireError("a varint longer than 10 bytes");
}

// src/history.ts
var Positions = class {
  #topics = /* @__PURE__ */ new Map();
  /** `topic` keeps history (an `Ack.history` named it), subscribed at `atMs`. */
  subscribed(topic, atMs) {
    if (!this.#topics.has(topic)) this.#topics.set(topic, { streams: /* @__PURE__ */ new Map(), sinceMs: atMs });
  }
  forget(topic) {
    this.#topics.delete(topic);
  }
  /** Whether the message is new at its position (and records it); one without a position is. */
  arrive(m) {
    if (m.stream === 0n) return true;
    const t = this.#topics.get(m.topic);
    if (!t) return true;
    const last = t.streams.get(m.stream);
    if (last !== void 0 && m.offset <= last) return false;
    t.streams.set(m.stream, m.offset);
    return true;
  }
  /** Streams no server holds any more: they will not be heard from again. */
  unknown(topic, streams) {
    const t = this.#topics.get(topic);
    for (const s of streams) t?.streams.delete(s);
  }
  /** What to recover, for the topics among `topics` that keep history. */
  recover(topics) {
    const out = [];
    for (const topic of topics) {
      const t = this.#topics.get(topic);
      if (!t) continue;
      out.push({
        topic,
        since: [...t.streams].map(([stream, offset]) => ({ stream, offset })),
        sinceMs: t.sinceMs
      });
    }
    return out;
  }
};

// src/login.ts
function loginChallenge(nonce, account, role, group) {
  const enc = new TextEncoder();
  const parts = [enc.encode("relaymesh-login-v1\0"), nonce];
  for (const part of [account, role, group]) {
    parts.push(Uint8Array.of(0), enc.encode(part));
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
async function login(coordinator, request = {}, fetchImpl = fetch) {
  const base = httpBase(coordinator);
  const body = {};
  if (request.credentials) {
    body.credentials = await credentialsJson(base, request.credentials, fetchImpl);
  }
  if (request.clientId) body.client_id = request.clientId;
  if (request.preferredServer) body.preferred_server = request.preferredServer;
  if (request.exclude?.length) body.exclude = request.exclude;
  if (request.moving) body.moving = true;
  const answer = await postJson(fetchImpl, `${base}/v1/login`, body);
  const { alias, node_id, server_id, url, key, expires_in_ms } = answer;
  if (typeof server_id !== "string" || typeof url !== "string" || typeof key !== "string") {
    throw new RelaymeshError("BAD_ANSWER", `${base}/v1/login answered without a server and key`);
  }
  return {
    alias: typeof alias === "string" ? alias : "",
    nodeId: typeof node_id === "string" && node_id !== "" ? node_id : void 0,
    serverId: server_id,
    url,
    key,
    expiresInMs: typeof expires_in_ms === "number" ? expires_in_ms : 0
  };
}
async function credentialsJson(base, credentials, fetchImpl) {
  if ("anonymous" in credentials) return { anonymous: {} };
  if ("accessCode" in credentials) {
    const { account: account2, code, role: role2 = "", group: group2 = "" } = credentials.accessCode;
    return { access_code: { account: account2, code, role: role2, group: group2 } };
  }
  if ("nodeToken" in credentials) return { node_token: { token: credentials.nodeToken } };
  const { account, identity, role = "", group = "" } = credentials.key;
  const challenge = await postJson(fetchImpl, `${base}/v1/login/challenge`, {});
  if (typeof challenge.challenge_id !== "string" || typeof challenge.nonce !== "string") {
    throw new RelaymeshError("BAD_ANSWER", `${base}/v1/login/challenge answered without a nonce`);
  }
  const signed = loginChallenge(fromHex(challenge.nonce), account, role, group);
  const signature = new Uint8Array(
    await crypto.subtle.sign({ name: "Ed25519" }, identity.privateKey, signed)
  );
  return {
    key: {
      account,
      public_key: identity.publicKeyHex,
      role,
      group,
      challenge_id: challenge.challenge_id,
      signature: toHex(signature)
    }
  };
}
async function postJson(fetchImpl, url, body) {
  let response;
  try {
    response = await fetchImpl(url, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body)
    });
  } catch (e) {
    throw new RelaymeshError("CONNECT_FAILED", `${url}: ${e.message}`);
  }
  let json;
  try {
    json = await response.json();
  } catch {
    throw new RelaymeshError("BAD_ANSWER", `${url} answered ${response.status}, not JSON`, response.status);
  }
  if (!response.ok) throw RelaymeshError.fromJson(json, response.status);
  return json;
}
function httpBase(address) {
  let a = address.trim().replace(/\/+$/, "");
  if (a.startsWith("ws://")) a = `http://${a.slice(5)}`;
  else if (a.startsWith("wss://")) a = `https://${a.slice(6)}`;
  else if (!/^https?:\/\//.test(a)) a = `http://${a}`;
  return a;
}
function toHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
function fromHex(hex) {
  if (hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new RelaymeshError("BAD_ANSWER", "not hex");
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

// src/client.ts
var PROTOCOL_VERSION = 1;
var FINAL_CLOSE_CODES = /* @__PURE__ */ new Set([1008, 4e3 + 15 /* REPLACED */, 4e3 + 27 /* KICKED */]);
var FINAL_LOGIN_ERRORS = /* @__PURE__ */ new Set([
  "UNKNOWN_ACCOUNT",
  "BAD_CREDENTIALS",
  "ACCOUNT_DISABLED",
  "ROLE_NOT_PERMITTED",
  "BAD_FRAME"
]);
var HOLD_LIMIT = 1e4;
var BATCH_BYTES = 64 * 1024;
var MAX_BATCH_PUBLISHES = 256;
var Client = class _Client {
  #options;
  #ws;
  #fetch;
  #listeners = /* @__PURE__ */ new Map();
  #link;
  /** The link being moved to, while a move off a drained server is under way. */
  #moving;
  /** Topics subscribed to (confirmed, or sent and restored at every reconnect). */
  #subscriptions = /* @__PURE__ */ new Set();
  #pendingSubscribes = /* @__PURE__ */ new Map();
  #pendingUnsubscribes = /* @__PURE__ */ new Map();
  #pendingLists = /* @__PURE__ */ new Map();
  #nextRequest = 1n;
  #nextSeq = 1n;
  /** Publishes not yet confirmed, in order. */
  #outbox = [];
  /** The latest number delivered per publisher: as originals (by `fromAlias`) and as resends
   * (by `resentFrom`), to drop copies. */
  #originals = /* @__PURE__ */ new Map();
  #resends = /* @__PURE__ */ new Map();
  /** Positions in the topics that keep history. */
  #positions = new Positions();
  /** Topics being recovered: live messages held until the recovery is done, and how many
   * the recovery delivered. */
  #recovering = /* @__PURE__ */ new Map();
  /** `history` requests, with the messages their batches brought so far. */
  #pendingHistory = /* @__PURE__ */ new Map();
  /** Reads message frames without the generic decoder. */
  #reader = new MessageReader();
  #closed = false;
  #reconnecting = false;
  constructor(options) {
    this.#options = {
      autoReconnect: true,
      outboundQueue: 1024,
      connectTimeoutMs: 1e4,
      subscribeTimeoutMs: 1e4,
      maxPublishers: 1e4,
      ...options
    };
    const ws = options.WebSocket ?? globalThis.WebSocket;
    if (!ws) {
      throw new RelaymeshError(
        "CONNECT_FAILED",
        "no WebSocket here: pass options.WebSocket (Node.js 20 needs --experimental-websocket)"
      );
    }
    this.#ws = ws;
    this.#fetch = options.fetch ?? fetch;
  }
  /** Logs in through the coordinator and connects to the comm server it offers. Fails with
   * the coordinator's or the server's refusal (`BAD_CREDENTIALS`, `KEY_INVALID`, ...). */
  static async connect(options) {
    const client = new _Client(options);
    await client.#connect(options.preferredServer, []);
    return client;
  }
  /** The comm server this client is connected to ("" while reconnecting). */
  get serverId() {
    return this.#link?.serverId ?? "";
  }
  /** This connection's alias ("" while reconnecting). */
  get alias() {
    return this.#link?.alias ?? "";
  }
  /** Publishes waiting to be confirmed. */
  get unconfirmed() {
    return this.#outbox.length;
  }
  /** The node this client is ("" when it is none, or while reconnecting): direct messages and
   * signals to this id reach it. */
  get nodeId() {
    return this.#link?.nodeId ?? "";
  }
  /** Sends `payload` to node `toNode` of this account, wherever in the cluster it is
   * connected, and returns its number. Numbered and queued like a publish: `undeliverable`
   * says when it reached no one (or, where the coordinator keeps inboxes, it waits in the
   * node's inbox). Throws `QUEUE_FULL` or `CLOSED` as `publish` does. */
  send(toNode, payload) {
    return this.#queue({ toNode, topic: "", payload });
  }
  /** Sends a signal (WebRTC-style set-up: `OFFER`, `ANSWER`, `ICE_CANDIDATE`, ...) to node
   * `toNode`. Never queued: throws `NOT_CONNECTED` while the client has no server, and an
   * offline node gets `undeliverable` back. Returns its number. */
  signal(toNode, kind, payload) {
    if (this.#closed) throw closedError();
    const link = this.#link;
    if (!link || link.restoring) {
      throw new RelaymeshError("NOT_CONNECTED", "a signal is never queued: the client is reconnecting");
    }
    const seq = this.#nextSeq++;
    this.#send(link, {
      case: "signal",
      value: { toNode, kind: SignalKind[kind], payload: bytesOf(payload), seq }
    });
    return seq;
  }
  /** Online nodes of this client's scope whose name or location contains `filter` (all when
   * empty): at most `limit` (0: the server's cap) chosen at random, and how many match. */
  listNodes(options = {}) {
    if (this.#closed) return Promise.reject(closedError());
    const link = this.#link;
    if (!link) return Promise.reject(new RelaymeshError("NOT_CONNECTED", "the client is reconnecting"));
    const requestId = this.#nextRequest++;
    const answer = this.#request(this.#pendingLists, requestId, {}, "no NodeList");
    this.#send(link, {
      case: "listNodes",
      value: { requestId, limit: options.limit ?? 0, filter: options.filter ?? "" }
    });
    return answer;
  }
  /** Reads a topic's history (a topic the comm servers keep history for; it need not be
   * subscribed): the newest `last` messages, or what followed the positions of the messages
   * in `after`, oldest first. `gap` says that some asked for are gone. Refused with
   * `FORBIDDEN` outside the role's subscribe rules, `NOT_FOUND` on a topic without history,
   * `RATE_LIMITED`. */
  history(topic, query) {
    if (this.#closed) return Promise.reject(closedError());
    const link = this.#link;
    if (!link) return Promise.reject(new RelaymeshError("NOT_CONNECTED", "the client is reconnecting"));
    const requestId = this.#nextRequest++;
    const since = [];
    if ("after" in query) {
      const last = /* @__PURE__ */ new Map();
      for (const { position: p } of query.after) {
        if (p.stream !== 0n && (last.get(p.stream) ?? 0n) < p.offset) last.set(p.stream, p.offset);
      }
      for (const [stream, offset] of last) since.push({ stream, offset });
    }
    const page = this.#request(this.#pendingHistory, requestId, { messages: [] }, `no history of ${topic}`);
    this.#send(link, {
      case: "history",
      value: {
        requestId,
        topic,
        last: "last" in query ? query.last : 0,
        since,
        sinceMs: "after" in query ? BigInt(query.sinceMs ?? 0) : 0n
      }
    });
    return page;
  }
  /** Waits for the answer to request `requestId`, kept in `pending` with `extra` until it
   * comes (see {@link take}) or `subscribeTimeoutMs` passes (`TIMEOUT: what`). */
  #request(pending, requestId, extra, what) {
    return new Promise((resolve, reject) => {
      const timer2 = setTimeout(() => {
        pending.delete(requestId);
        reject(new RelaymeshError("TIMEOUT", what));
      }, this.#options.subscribeTimeoutMs);
      pending.set(requestId, { ...extra, resolve, reject, timer: timer2 });
    });
  }
  /** Calls `listener` for each `event`; returns a function that stops it. */
  on(event, listener) {
    let set = this.#listeners.get(event);
    if (!set) {
      set = /* @__PURE__ */ new Set();
      this.#listeners.set(event, set);
    }
    set.add(listener);
    return () => set.delete(listener);
  }
  /** Subscribes to `topics` (exact names: wildcards belong to role rules). Resolves once
   * every server of the cluster has the subscription: a message published anywhere from then
   * on reaches this client. Rejects with the server's refusal (`FORBIDDEN`,
   * `INVALID_TOPIC`, `LIMIT_EXCEEDED`), `NOT_CONFIRMED` when some server never confirmed (the
   * subscription stands), or `TIMEOUT`. While reconnecting it waits for the next server. */
  subscribe(topics) {
    const list = typeof topics === "string" ? [topics] : [...topics];
    if (this.#closed) return Promise.reject(closedError());
    if (list.length === 0) return Promise.resolve();
    const requestId = this.#nextRequest++;
    return new Promise((resolve, reject) => {
      const timer2 = setTimeout(() => {
        this.#pendingSubscribes.delete(requestId);
        reject(new RelaymeshError("TIMEOUT", `no Ack for the subscription to ${list.join(", ")}`));
      }, this.#options.subscribeTimeoutMs);
      this.#pendingSubscribes.set(requestId, { topics: list, resolve, reject, timer: timer2 });
      if (this.#link && !this.#link.restoring) {
        this.#send(this.#link, {
          case: "subscribe",
          value: { requestId, topics: list, recover: [] }
        });
      }
    });
  }
  /** Ends the subscriptions to `topics`; resolves when this server no longer delivers them. */
  unsubscribe(topics) {
    const list = typeof topics === "string" ? [topics] : [...topics];
    for (const t of list) {
      this.#subscriptions.delete(t);
      this.#positions.forget(t);
    }
    for (const p of this.#pendingSubscribes.values()) p.topics = p.topics.filter((t) => !list.includes(t));
    if (!this.#link || list.length === 0) return Promise.resolve();
    const requestId = this.#nextRequest++;
    return new Promise((resolve) => {
      this.#pendingUnsubscribes.set(requestId, resolve);
      if (this.#link) {
        this.#send(this.#link, { case: "unsubscribe", value: { requestId, topics: list } });
      }
    });
  }
  /** Publishes `payload` (bytes, or text as UTF-8) on `topic` and returns its number. It is
   * sent now, or when the client is connected again; a publish the server did not confirm
   * before it was lost is sent again through the next one, and receivers drop the copy.
   * Throws `QUEUE_FULL` when `outboundQueue` publishes wait for confirmation, `CLOSED` after
   * `close`. */
  publish(topic, payload) {
    return this.#queue({ topic, payload });
  }
  #queue(what) {
    if (this.#closed) throw closedError();
    if (this.#outbox.length >= this.#options.outboundQueue) {
      throw new RelaymeshError(
        "QUEUE_FULL",
        `${this.#outbox.length} publishes wait for their server's confirmation (outboundQueue)`
      );
    }
    const out = {
      seq: this.#nextSeq++,
      topic: what.topic,
      toNode: what.toNode,
      payload: bytesOf(what.payload),
      firstAlias: ""
    };
    this.#outbox.push(out);
    if (this.#link && !this.#link.restoring) this.#sendPublish(this.#link, out);
    return out.seq;
  }
  /** Closes the connection; the client does not reconnect. */
  close() {
    if (this.#closed) return;
    this.#closed = true;
    this.#abandonMove();
    const link = this.#link;
    this.#link = void 0;
    if (link) {
      stopHeartbeat(link);
      link.ws.close(1e3);
    }
    this.#failPending(closedError());
    this.#emit("closed", { reason: "closed by the application" });
  }
  // ---- connecting -----------------------------------------------------------------------
  async #connect(preferred, exclude) {
    const placement = await login(
      this.#options.coordinator,
      {
        credentials: this.#options.credentials,
        clientId: this.#options.clientId,
        preferredServer: preferred,
        exclude
      },
      this.#fetch
    );
    const link = await this.#open(placement);
    if (this.#closed) {
      link.ws.close(1e3);
      throw closedError();
    }
    this.#link = link;
    const held = link.held ?? [];
    link.held = void 0;
    this.#onBatch(link, held);
    this.#startHeartbeat(link);
    const standing = [...this.#subscriptions];
    if (standing.length > 0) {
      const recover = this.#positions.recover(standing);
      for (const r of recover) this.#recovering.set(r.topic, { held: [], count: 0 });
      const requestId = this.#nextRequest;
      try {
        await this.#restore(link, standing, recover);
      } catch (e) {
        const error = e;
        this.#pendingSubscribes.delete(requestId);
        if (this.#closed) throw error;
        if (error.code === "TIMEOUT" || error.code === "CONNECT_FAILED") {
          if (this.#link === link) {
            this.#link = void 0;
            stopHeartbeat(link);
            link.ws.close(1e3);
          }
          throw error;
        }
        if (error.code !== "NOT_CONFIRMED") {
          for (const t of standing) {
            this.#subscriptions.delete(t);
            this.#positions.forget(t);
            this.#recovering.delete(t);
          }
          this.#emit("subscriptionsRefused", { topics: standing, reason: error.message });
        }
      } finally {
        link.restoreRequest = void 0;
      }
    }
    this.#restored(link);
  }
  /** Subscribes `link` to the standing `topics` in one request and waits for its Ack. */
  #restore(link, topics, recover) {
    const requestId = this.#nextRequest++;
    const restored = new Promise((resolve, reject) => {
      const timer2 = setTimeout(
        () => reject(new RelaymeshError("TIMEOUT", "no Ack for the restored subscriptions")),
        this.#options.subscribeTimeoutMs
      );
      this.#pendingSubscribes.set(requestId, {
        topics,
        resolve: () => {
          clearTimeout(timer2);
          resolve();
        },
        reject: (e) => {
          clearTimeout(timer2);
          reject(e);
        },
        timer: timer2
      });
    });
    link.restoreRequest = requestId;
    this.#send(link, { case: "subscribe", value: { requestId, topics, recover } });
    return restored.finally(() => {
      link.restoreRequest = void 0;
      this.#pendingSubscribes.delete(requestId);
    });
  }
  /** `link`'s standing subscriptions are back: what waited for it goes out. */
  #restored(link) {
    for (const [requestId, p] of this.#pendingSubscribes) {
      if (p.topics.length === 0) {
        this.#pendingSubscribes.delete(requestId);
        clearTimeout(p.timer);
        p.resolve();
        continue;
      }
      this.#send(link, { case: "subscribe", value: { requestId, topics: p.topics, recover: [] } });
    }
    link.restoring = false;
    for (const out of this.#outbox) this.#sendPublish(link, out);
    const drained = link.drainReason;
    link.drainReason = void 0;
    if (drained !== void 0 && this.#link === link) void this.#move(link, drained);
  }
  // ---- moving off a drained server ------------------------------------------------------
  /** The server behind `old` is being drained: move make-before-break. Nothing new goes to
   * it; another server is found through the coordinator and subscribed while `old` is still
   * read; then `old` is sent `Leave` and read up to its `Left`, so everything queued for the
   * client there arrives; then the new link takes over. A move that cannot be made ends `old`
   * as a lost server would. */
  async #move(old, reason) {
    old.restoring = true;
    this.#flushPublishes(old);
    let next;
    try {
      const placement = await login(
        this.#options.coordinator,
        {
          credentials: this.#options.credentials,
          clientId: this.#options.clientId,
          exclude: [old.serverId],
          moving: true
        },
        this.#fetch
      );
      if (this.#closed || this.#link !== old) return;
      next = await this.#open(placement);
      if (this.#closed || this.#link !== old) {
        next.ws.close(1e3);
        return;
      }
      this.#moving = next;
      this.#startHeartbeat(next);
      next.restored = [...this.#subscriptions];
      if (next.restored.length > 0) {
        try {
          await this.#restore(next, [...next.restored], []);
        } catch (e) {
          if (e.code !== "NOT_CONFIRMED") throw e;
        }
      }
    } catch (e) {
      if (next && this.#moving === next) this.#abandonMove();
      if (this.#link === old && !this.#closed) {
        old.lastError = new RelaymeshError(
          "SHUTTING_DOWN",
          `${reason}; moving failed: ${e.message}`
        );
        old.ws.close(1e3);
      }
      return;
    }
    if (this.#link !== old || this.#moving !== next) return;
    const timer2 = setTimeout(() => {
      if (!this.#moved(old, false)) old.ws.close(1e3);
    }, this.#options.subscribeTimeoutMs);
    old.leaving = { to: next, reason, timer: timer2 };
    this.#write(old, { case: "leave", value: {} });
  }
  /** Gives up the move under way, if any: the link being moved to is closed and forgotten
   * (its restore, if waited for, fails), and the link moved from stops waiting for `Left`. */
  #abandonMove() {
    const next = this.#moving;
    if (!next) return;
    this.#moving = void 0;
    stopHeartbeat(next);
    next.held = void 0;
    const restore = next.restoreRequest !== void 0 ? this.#pendingSubscribes.get(next.restoreRequest) : void 0;
    restore?.reject(new RelaymeshError("CONNECT_FAILED", `the move to ${next.serverId} was given up`));
    next.ws.close(1e3);
    const old = this.#link;
    if (old?.leaving) {
      clearTimeout(old.leaving.timer);
      old.leaving = void 0;
    }
  }
  /** Ends the move from `old` (sent `Leave`): `clean` when `old` was read to its end
   * (`Left`). False when the server moved to was lost meanwhile: `old` is then left as a lost
   * server. */
  #moved(old, clean) {
    const leaving = old.leaving;
    if (!leaving) return false;
    clearTimeout(leaving.timer);
    old.leaving = void 0;
    const next = leaving.to;
    if (this.#link !== old || this.#moving !== next) return false;
    const reason = leaving.reason;
    this.#moving = void 0;
    stopHeartbeat(old);
    this.#link = next;
    old.ws.close(1e3);
    for (const resolve of this.#pendingUnsubscribes.values()) resolve();
    this.#pendingUnsubscribes.clear();
    const lost = new RelaymeshError("CONNECT_FAILED", `${old.serverId} was left`);
    rejectAll(this.#pendingLists, lost);
    rejectAll(this.#pendingHistory, lost);
    this.#cutRecoveries();
    const held = next.held ?? [];
    next.held = void 0;
    for (const m of held) {
      if (this.#link !== next) return true;
      if (m.topic.startsWith("@") || this.#subscriptions.has(m.topic)) this.#onMessage(m);
    }
    const restored = new Set(next.restored ?? []);
    next.restored = void 0;
    const waiting = new Set([...this.#pendingSubscribes.values()].flatMap((p) => p.topics));
    const gone = [...restored].filter((t) => !this.#subscriptions.has(t) && !waiting.has(t));
    if (gone.length > 0) {
      this.#send(next, { case: "unsubscribe", value: { requestId: this.#nextRequest++, topics: gone } });
    }
    const added = [...this.#subscriptions].filter((t) => !restored.has(t) && !waiting.has(t));
    if (added.length > 0) {
      this.#restore(next, added, []).catch((e) => {
        if (e.code === "NOT_CONFIRMED" || e.code === "CONNECT_FAILED" || e.code === "CLOSED") return;
        for (const t of added) {
          this.#subscriptions.delete(t);
          this.#positions.forget(t);
        }
        this.#emit("subscriptionsRefused", { topics: added, reason: e.message });
      });
    }
    this.#restored(next);
    if (clean) {
      this.#emit("moved", { fromServer: old.serverId, serverId: next.serverId, alias: next.alias, reason });
    } else {
      this.#emit("disconnected", {
        serverId: old.serverId,
        reason: `moving (${reason}): the server ended before sending everything queued here`
      });
      this.#emit("reconnected", { serverId: next.serverId, alias: next.alias });
    }
    return true;
  }
  /** Ends the recoveries under way: what each held goes out now (positions drop what a later
   * recovery brings again). */
  #cutRecoveries() {
    for (const [topic, r] of this.#recovering) {
      this.#recovering.delete(topic);
      for (const m of r.held) if (this.#positions.arrive(m)) this.#deliver(m);
    }
  }
  /** Opens the WebSocket with the placement's key, attaches, and waits for `Ready`. */
  #open(placement) {
    const url = `${placement.url}?key=${encodeURIComponent(placement.key)}&batch=1`;
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this.#ws(url);
      } catch (e) {
        reject(new RelaymeshError("CONNECT_FAILED", `${placement.url}: ${e.message}`));
        return;
      }
      ws.binaryType = "arraybuffer";
      let settled = false;
      const fail = (e) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer2);
        try {
          ws.close();
        } catch {
        }
        reject(e);
      };
      const timer2 = setTimeout(
        () => fail(new RelaymeshError("TIMEOUT", `${placement.serverId} sent no Ready`)),
        this.#options.connectTimeoutMs
      );
      ws.onopen = () => {
        ws.send(
          toBinary(
            ClientToServerSchema,
            create(ClientToServerSchema, {
              kind: { case: "attach", value: { protocolVersion: PROTOCOL_VERSION } }
            })
          )
        );
      };
      ws.onerror = () => {
        if (!settled) void this.#refused(placement).then(fail);
      };
      ws.onclose = (ev) => {
        if (!settled) void this.#refused(placement, ev).then(fail);
      };
      ws.onmessage = (ev) => {
        if (settled) return;
        const frame = decode(ev.data);
        if (!frame) {
          fail(new RelaymeshError("BAD_FRAME", `${placement.serverId} sent a frame that is not a ServerToClient`));
          return;
        }
        if (frame.kind.case === "error") {
          fail(RelaymeshError.fromWire(frame.kind.value.code, frame.kind.value.message));
          return;
        }
        if (frame.kind.case !== "ready") {
          fail(new RelaymeshError("UNEXPECTED_MESSAGE", `${placement.serverId} sent ${frame.kind.case} before Ready`));
          return;
        }
        settled = true;
        clearTimeout(timer2);
        const ready = frame.kind.value;
        const link = {
          ws,
          serverId: ready.serverId || placement.serverId,
          alias: ready.alias || placement.alias,
          nodeId: ready.nodeId || (placement.nodeId ?? ""),
          interval: ready.heartbeatIntervalMs || 5e3,
          timeout: ready.heartbeatTimeoutMs || 15e3,
          heartbeat: void 0,
          lastHeard: Date.now(),
          restoring: true,
          maxFrameBytes: ready.maxFrameBytes,
          maxBatchPublishes: ready.maxBatchPublishes,
          held: []
        };
        ws.onmessage = (e) => this.#onFrame(link, e.data);
        ws.onclose = (e) => this.#onClose(link, e);
        resolve(link);
      };
    });
  }
  /** Why `placement`'s server refused the connection or closed it before `Ready`: a close
   * code says; otherwise the server either answers HTTP (it refused the upgrade, whose status
   * a WebSocket cannot see) or cannot be reached. */
  async #refused(placement, ev) {
    if (ev && ev.code >= 4e3 && ev.code < 5e3 && ErrorCode[ev.code - 4e3] !== void 0) {
      return new RelaymeshError(
        ErrorCode[ev.code - 4e3],
        ev.reason || `${placement.serverId} closed the connection`
      );
    }
    let answers = false;
    try {
      await this.#fetch(httpBase(placement.url), { mode: "no-cors" });
      answers = true;
    } catch {
    }
    if (answers) {
      return new RelaymeshError(
        "UPGRADE_REFUSED",
        `${placement.serverId} refused the WebSocket before it opened: the key was spent, expired or unknown (KEY_INVALID), or the server is full or draining, or this address has too many connections; log in again for another key`
      );
    }
    return new RelaymeshError(
      "CONNECT_FAILED",
      `${placement.serverId} (${placement.url}) cannot be reached`
    );
  }
  // ---- a connected link -----------------------------------------------------------------
  #onFrame(link, data) {
    if (this.#link !== link && this.#moving !== link && link.held === void 0) return;
    link.lastHeard = Date.now();
    if (!(data instanceof ArrayBuffer)) {
      this.#badFrame(link, "the server sent a text frame");
      return;
    }
    const bytes = new Uint8Array(data);
    let message;
    let batch;
    try {
      message = this.#reader.read(bytes);
      if (!message) batch = this.#reader.readBatch(bytes);
    } catch (e) {
      this.#badFrame(link, `the server sent a message that does not decode: ${e.message}`);
      return;
    }
    if (message) {
      this.#arrived(link, message);
      return;
    }
    if (batch) {
      this.#onBatch(link, batch);
      return;
    }
    const frame = decode(data);
    if (!frame) {
      this.#badFrame(link, "the server sent a frame that is not a ServerToClient");
      return;
    }
    const kind = frame.kind;
    switch (kind.case) {
      case "message":
        this.#arrived(link, kind.value);
        return;
      case "batch":
        this.#onBatch(link, kind.value.messages);
        return;
      case "ack": {
        const ack = kind.value;
        const sub = this.#pendingSubscribes.get(ack.requestId);
        if (sub) {
          for (const t of sub.topics) this.#subscriptions.add(t);
          for (const t of ack.history) this.#positions.subscribed(t, ack.atMs);
          for (const t of sub.topics) {
            if (this.#recovering.has(t) && !ack.history.includes(t)) this.#endRecovery(t, true, 0);
          }
          if (ack.pending.length === 0) {
            this.#pendingSubscribes.delete(ack.requestId);
            clearTimeout(sub.timer);
            sub.resolve();
          } else if (sub.acked) {
            this.#pendingSubscribes.delete(ack.requestId);
            clearTimeout(sub.timer);
            sub.reject(
              new RelaymeshError(
                "NOT_CONFIRMED",
                `servers ${ack.pending.join(", ")} did not confirm the subscription (it stands)`
              )
            );
          } else {
            sub.acked = true;
          }
          return;
        }
        const unsub = this.#pendingUnsubscribes.get(ack.requestId);
        if (unsub) {
          this.#pendingUnsubscribes.delete(ack.requestId);
          unsub();
        }
        return;
      }
      case "published": {
        const upTo = kind.value.upTo;
        while (this.#outbox.length > 0 && this.#outbox[0].seq <= upTo) this.#outbox.shift();
        return;
      }
      case "dropped":
        this.#emit("dropped", {
          count: Number(kind.value.count),
          upstream: Number(kind.value.upstream)
        });
        return;
      case "error": {
        const e = kind.value;
        const error = RelaymeshError.fromWire(e.code, e.message);
        const refused = take(this.#pendingHistory, e.requestId) ?? take(this.#pendingLists, e.requestId);
        if (refused) {
          refused.reject(error);
          return;
        }
        const unsub = e.requestId !== 0n ? this.#pendingUnsubscribes.get(e.requestId) : void 0;
        if (unsub) {
          this.#pendingUnsubscribes.delete(e.requestId);
          unsub();
          return;
        }
        const sub = e.requestId !== 0n ? this.#pendingSubscribes.get(e.requestId) : void 0;
        if (sub) {
          this.#pendingSubscribes.delete(e.requestId);
          clearTimeout(sub.timer);
          sub.reject(error);
          return;
        }
        if (e.code === 4 /* FORBIDDEN */) {
          this.#emit("forbidden", { message: e.message });
          return;
        }
        link.lastError = error;
        return;
      }
      case "history": {
        const batch2 = kind.value;
        if (batch2.recovery) {
          const r = this.#recovering.get(batch2.topic);
          if (!r) return;
          this.#positions.unknown(batch2.topic, batch2.unknownStreams);
          for (const m of batch2.messages) {
            if (this.#positions.arrive(m)) {
              r.count++;
              this.#deliver(m);
            }
          }
          if (batch2.done) this.#endRecovery(batch2.topic, batch2.gap, Number(batch2.missedAtLeast));
          return;
        }
        const page = this.#pendingHistory.get(batch2.requestId);
        if (!page) return;
        for (const m of batch2.messages) page.messages.push(new Delivered(m));
        if (batch2.done && take(this.#pendingHistory, batch2.requestId)) {
          page.resolve({ messages: page.messages, gap: batch2.gap, missedAtLeast: Number(batch2.missedAtLeast) });
        }
        return;
      }
      case "undeliverable": {
        const u = kind.value;
        this.#emit("undeliverable", {
          seq: u.seq,
          toNode: u.toNode,
          reason: ErrorCode[u.reason] ?? String(u.reason),
          message: u.message
        });
        return;
      }
      case "nodeList": {
        take(this.#pendingLists, kind.value.requestId)?.resolve({
          nodes: kind.value.nodes.map(nodeInfo),
          total: Number(kind.value.total)
        });
        return;
      }
      case "reconnect": {
        const reason = kind.value.reason || "drained";
        if (link === this.#link && this.#options.autoReconnect) {
          if (this.#moving || link.leaving) return;
          if (link.restoring) {
            link.drainReason = reason;
            return;
          }
          void this.#move(link, reason);
          return;
        }
        link.lastError = new RelaymeshError("SHUTTING_DOWN", reason);
        link.ws.close(1e3);
        return;
      }
      case "accepted": {
        const { seq, toNode, inboxId } = kind.value;
        this.#emit("accepted", { seq, toNode, inboxId });
        return;
      }
      case "expired": {
        const { toNode, inboxId, seq, publisher, storedMs } = kind.value;
        this.#emit("expired", { toNode, inboxId, seq, publisher, storedMs });
        return;
      }
      case "left":
        if (!this.#moved(link, true)) link.ws.close(1e3);
        return;
      default:
        return;
    }
  }
  /** Whether message `seq` of `fromAlias` (a resend of `resentFrom`'s when set) is new. An
   * original raises its publisher's number; a resend is new only while above both the
   * original's number and the resends seen, and raises only the latter, so a resend can never
   * hide another publisher's originals (`resent_from` is the sender's word). */
  #fresh(fromAlias, resentFrom, seq) {
    if (resentFrom === "") return raise(this.#originals, fromAlias, seq, this.#options.maxPublishers);
    const original = this.#originals.get(resentFrom);
    if (original !== void 0 && seq <= original) return false;
    return raise(this.#resends, resentFrom, seq, this.#options.maxPublishers);
  }
  /** The recovery of `topic` is over: a gap is reported first, then the live messages that
   * waited are delivered (those the recovery brought are dropped), then `recovered`. */
  #endRecovery(topic, gap, missedAtLeast) {
    const r = this.#recovering.get(topic);
    if (!r) return;
    this.#recovering.delete(topic);
    if (gap) this.#emit("recoveryGap", { topic, missedAtLeast });
    for (const m of r.held) if (this.#positions.arrive(m)) this.#deliver(m);
    this.#emit("recovered", { topic, count: r.count });
  }
  #badFrame(link, message) {
    link.lastError = new RelaymeshError("BAD_FRAME", message);
    link.ws.close(4e3 + 1 /* BAD_FRAME */);
  }
  /** A batch's messages in order, as if each had come alone (what follows a handler that
   * closed the client is not handed on, as later frames would not be). */
  #onBatch(link, messages) {
    for (const m of messages) if (!this.#arrived(link, m)) return;
  }
  /** A message from `link`: held while `link` is being moved to (until the old server has
   * been read to its end), delivered otherwise. False once `link` is no longer the client's. */
  #arrived(link, m) {
    const held = link.held;
    if (held) {
      held.push(m);
      if (held.length > HOLD_LIMIT) {
        link.lastError = new RelaymeshError("LIMIT_EXCEEDED", `${HOLD_LIMIT} messages arrived while moving`);
        link.ws.close(1e3);
      }
      return true;
    }
    if (this.#link !== link) return false;
    this.#onMessage(m);
    return true;
  }
  #onMessage(m) {
    if (m.stream !== 0n) {
      const recovering = this.#recovering.get(m.topic);
      if (recovering) {
        recovering.held.push(m);
        return;
      }
      if (!this.#positions.arrive(m)) return;
    }
    this.#deliver(m);
  }
  /** Hands a new message to the application (a copy by its publisher's number is dropped). */
  #deliver(m) {
    const seq = m.seq;
    if (seq > 0n && !this.#fresh(m.fromAlias, m.resentFrom, seq)) return;
    if (m.signal !== 0) {
      this.#emit("signal", {
        fromNode: m.fromNode,
        fromAlias: m.fromAlias,
        kind: SignalKind[m.signal] ?? "CUSTOM",
        payload: m.payload,
        seq
      });
      return;
    }
    if (m.topic.startsWith("@node/")) {
      const payload = m.payload;
      const heard = (this.#listeners.get("direct")?.size ?? 0) > 0;
      this.#emit("direct", {
        fromNode: m.fromNode,
        fromAlias: m.fromAlias,
        fromRole: m.fromRole,
        payload,
        seq,
        inboxId: m.inboxId,
        text: () => textDecoder.decode(payload)
      });
      const link = this.#link;
      if (m.inboxId > 0n && link) {
        if (!heard) link.inboxUnheard = true;
        if (!link.inboxUnheard) this.#send(link, { case: "inboxAck", value: { upTo: m.inboxId } });
      }
      return;
    }
    if (m.topic === "@presence") {
      let event;
      try {
        event = fromBinary(PresenceEventSchema, m.payload);
      } catch {
        return;
      }
      const change = PresenceChange[event.change]?.toLowerCase();
      if ((change === "online" || change === "offline" || change === "updated") && event.node) {
        this.#emit("presence", { change, node: nodeInfo(event.node) });
      }
      return;
    }
    this.#emit("message", new Delivered(m));
  }
  #onClose(link, ev) {
    stopHeartbeat(link);
    const reason = link.lastError?.message ?? (ev.reason || `the connection closed (${ev.code})`);
    const final = FINAL_CLOSE_CODES.has(ev.code);
    if (link === this.#moving) {
      this.#abandonMove();
      const old = this.#link;
      if (final && old && !this.#closed) {
        this.#link = void 0;
        stopHeartbeat(old);
        old.ws.close(1e3);
        this.#emit("disconnected", { serverId: old.serverId, reason });
        this.#finish(reason, link.lastError?.code ?? ErrorCode[ev.code - 4e3]);
      }
      return;
    }
    if (this.#link !== link) return;
    if (!final && this.#moved(link, false)) return;
    this.#abandonMove();
    this.#link = void 0;
    if (this.#closed) return;
    for (const resolve of this.#pendingUnsubscribes.values()) resolve();
    this.#pendingUnsubscribes.clear();
    const lost = new RelaymeshError("CONNECT_FAILED", `${link.serverId} was lost`);
    rejectAll(this.#pendingLists, lost);
    rejectAll(this.#pendingHistory, lost);
    this.#cutRecoveries();
    const restore = link.restoreRequest !== void 0 ? this.#pendingSubscribes.get(link.restoreRequest) : void 0;
    if (final) {
      if (!restore) this.#emit("disconnected", { serverId: link.serverId, reason });
      this.#finish(reason, link.lastError?.code ?? ErrorCode[ev.code - 4e3]);
      return;
    }
    if (restore) {
      restore.reject(new RelaymeshError("CONNECT_FAILED", `${link.serverId} was lost while restoring`));
      return;
    }
    this.#emit("disconnected", { serverId: link.serverId, reason });
    if (!this.#options.autoReconnect) {
      this.#finish(reason, link.lastError?.code);
      return;
    }
    void this.#reconnect(link.serverId);
  }
  async #reconnect(lost) {
    if (this.#reconnecting) return;
    this.#reconnecting = true;
    const { initialMs = 100, maxMs = 5e3, giveUpAfterMs = 0 } = this.#options.reconnect ?? {};
    const started = Date.now();
    let ceiling = initialMs;
    let exclude = [lost];
    try {
      while (!this.#closed) {
        await sleep(Math.random() * ceiling);
        if (this.#closed) return;
        try {
          await this.#connect(void 0, exclude);
          const link = this.#link;
          if (link) {
            this.#emit("reconnected", { serverId: link.serverId, alias: link.alias });
            return;
          }
          exclude = [lost];
          ceiling = Math.min(maxMs, ceiling * 2);
          continue;
        } catch (e) {
          const error = e;
          if (FINAL_LOGIN_ERRORS.has(error.code) || error.code === "CLOSED") {
            this.#finish(error.message, error.code);
            return;
          }
          if (error.code === "NO_SERVER_AVAILABLE") exclude = [];
          if (giveUpAfterMs > 0 && Date.now() - started > giveUpAfterMs) {
            this.#finish(`no server reached for ${giveUpAfterMs} ms: ${error.message}`, error.code);
            return;
          }
          ceiling = Math.min(maxMs, ceiling * 2);
        }
      }
    } finally {
      this.#reconnecting = false;
    }
  }
  #finish(reason, code) {
    if (this.#closed) return;
    this.#closed = true;
    this.#abandonMove();
    this.#failPending(new RelaymeshError("CLOSED", reason));
    this.#emit("closed", { reason, code });
  }
  #failPending(error) {
    for (const p of this.#pendingSubscribes.values()) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    this.#pendingSubscribes.clear();
    for (const resolve of this.#pendingUnsubscribes.values()) resolve();
    this.#pendingUnsubscribes.clear();
    rejectAll(this.#pendingLists, error);
    rejectAll(this.#pendingHistory, error);
  }
  #startHeartbeat(link) {
    const { interval, timeout } = link;
    let nonce = 0n;
    link.heartbeat = setInterval(() => {
      if (Date.now() - link.lastHeard > timeout) {
        link.lastError = new RelaymeshError("HEARTBEAT_TIMEOUT", `nothing heard for ${timeout} ms`);
        stopHeartbeat(link);
        link.ws.close(4e3 + 13 /* HEARTBEAT_TIMEOUT */);
        this.#onClose(link, { code: 4e3 + 13 /* HEARTBEAT_TIMEOUT */, reason: "" });
        return;
      }
      this.#send(link, { case: "ping", value: { nonce: ++nonce } });
    }, interval);
    link.heartbeat.unref?.();
  }
  #sendPublish(link, out) {
    const resentFrom = out.firstAlias !== "" && out.firstAlias !== link.alias ? out.firstAlias : "";
    if (out.firstAlias === "") out.firstAlias = link.alias;
    if (out.toNode !== void 0) {
      this.#send(link, {
        case: "send",
        value: { toNode: out.toNode, payload: out.payload, seq: out.seq, resentFrom }
      });
      return;
    }
    const publish = { topic: out.topic, payload: out.payload, seq: out.seq, resentFrom };
    if (link.maxFrameBytes === 0 || link.maxBatchPublishes === 0) {
      this.#send(link, { case: "publish", value: publish });
      return;
    }
    const size = out.payload.length + 3 * (out.topic.length + resentFrom.length) + 32;
    const limit = Math.min(BATCH_BYTES, link.maxFrameBytes - 1024);
    const batch = link.batch;
    const most = Math.min(MAX_BATCH_PUBLISHES, link.maxBatchPublishes);
    if (batch && (batch.bytes + size > limit || batch.publishes.length >= most)) this.#flushPublishes(link);
    if (!link.batch) {
      link.batch = { publishes: [], bytes: 16 };
      queueMicrotask(() => this.#flushPublishes(link));
    }
    link.batch.publishes.push(publish);
    link.batch.bytes += size;
  }
  /** Sends the publishes waiting in `link.batch`: one alone, several as a `PublishBatch`. */
  #flushPublishes(link) {
    const batch = link.batch;
    if (!batch) return;
    link.batch = void 0;
    const [first, ...more] = batch.publishes;
    this.#write(
      link,
      more.length === 0 ? { case: "publish", value: first } : { case: "batch", value: { publishes: batch.publishes } }
    );
  }
  #send(link, kind) {
    this.#flushPublishes(link);
    this.#write(link, kind);
  }
  #write(link, kind) {
    if (link.ws.readyState !== 1) return;
    link.ws.send(toBinary(ClientToServerSchema, create(ClientToServerSchema, { kind })));
  }
  #emit(event, value) {
    for (const listener of this.#listeners.get(event) ?? []) {
      try {
        listener(value);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
};
var Delivered = class {
  topic;
  fromAlias;
  fromRole;
  fromNode;
  payload;
  seq;
  /** Its place in the topic's history (stream 0: none). */
  position;
  constructor(m) {
    this.position = { stream: m.stream, offset: m.offset, publishedMs: m.publishedMs };
    this.topic = m.topic;
    this.fromAlias = m.fromAlias;
    this.fromRole = m.fromRole;
    this.fromNode = m.fromNode;
    this.payload = m.payload;
    this.seq = m.seq;
  }
  text() {
    return textDecoder.decode(this.payload);
  }
};
var textDecoder = new TextDecoder();
function take(pending, requestId) {
  const w = pending.get(requestId);
  if (w) {
    pending.delete(requestId);
    clearTimeout(w.timer);
  }
  return w;
}
function rejectAll(pending, error) {
  for (const w of pending.values()) {
    clearTimeout(w.timer);
    w.reject(error);
  }
  pending.clear();
}
function raise(seen, publisher, seq, max) {
  const last = seen.get(publisher);
  if (last !== void 0 && seq <= last) return false;
  seen.set(publisher, seq);
  if (last === void 0 && seen.size > max) {
    const oldest = seen.keys().next().value;
    if (oldest !== void 0) seen.delete(oldest);
  }
  return true;
}
function bytesOf(payload) {
  return typeof payload === "string" ? new TextEncoder().encode(payload) : payload;
}
function nodeInfo(n) {
  return {
    nodeId: n.nodeId,
    name: n.name,
    location: n.location,
    info: n.info,
    sinceMs: Number(n.sinceMs),
    servers: [...n.servers]
  };
}
function decode(data) {
  if (!(data instanceof ArrayBuffer)) return void 0;
  try {
    return fromBinary(ServerToClientSchema, new Uint8Array(data));
  } catch {
    return void 0;
  }
}
function stopHeartbeat(link) {
  if (link.heartbeat !== void 0) clearInterval(link.heartbeat);
  link.heartbeat = void 0;
}
function closedError() {
  return new RelaymeshError("CLOSED", "the client is closed");
}
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// console/console.ts
var POLL_MS = 1e3;
var TAIL_LINES = 200;
var TOKEN_KEY = "relaymesh-console-token";
var $ = (id) => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`no #${id}`);
  return el;
};
var previous;
var timer;
async function api(path) {
  return fetch(path, { headers: { authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) ?? ""}` } });
}
async function poll() {
  try {
    const response = await api("/console/api/cluster");
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("that token was refused");
      return;
    }
    const view = await response.json();
    render(view);
    previous = view;
  } catch (e) {
    $("summary").textContent = `coordinator unreachable: ${e.message}`;
  }
  timer = setTimeout(() => void poll(), POLL_MS);
}
function rate(now, server, key) {
  const before = previous?.servers.find((s) => s.id === server.id)?.stats;
  const after = server.stats;
  if (!before || !after || !previous) return "";
  const seconds = (now.at_ms - previous.at_ms) / 1e3;
  if (seconds <= 0) return "";
  return Math.max(0, (after[key] - before[key]) / seconds).toFixed(0);
}
function cpu(now, server) {
  const before = previous?.servers.find((s) => s.id === server.id)?.stats;
  if (!before || !server.stats || !previous) return "";
  const seconds = (now.at_ms - previous.at_ms) / 1e3;
  if (seconds <= 0) return "";
  return (100 * (server.stats.cpu_seconds - before.cpu_seconds) / seconds).toFixed(1);
}
function state(s) {
  if (s.error) return ["unreachable", "bad"];
  if (s.unresponsive) return ["unresponsive", "bad"];
  if (s.draining) return ["draining", "warn"];
  return s.eligible ? ["up", "ok"] : ["not eligible", "warn"];
}
function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}
function render(view) {
  const c = view.coordinator;
  const clientsOf = (s) => s.stats?.clients ?? s.clients;
  const clients = view.servers.reduce((n, s) => n + clientsOf(s), 0);
  $("summary").textContent = `coordinator ${c.version}, up ${c.uptime_s} s · ${view.servers.length} servers · ${clients} clients · ${c.logins} logins · ${c.nodes_online} nodes online`;
  const body = $("servers");
  body.replaceChildren(
    ...view.servers.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.server = s.id;
      const [label, cls] = state(s);
      tr.append(
        cell(s.id),
        cell(label, cls),
        cell(`${clientsOf(s)} / ${s.capacity}`, "n"),
        cell(String(s.stats?.topics ?? s.topics), "n"),
        cell(rate(view, s, "messages_in"), "n"),
        cell(rate(view, s, "messages_out"), "n"),
        cell(cpu(view, s), "n"),
        cell(s.stats ? (s.stats.rss_bytes / 1048576).toFixed(1) : "", "n"),
        cell(s.stats ? String(s.stats.peers) : "", "n")
      );
      if (s.error) tr.title = s.error;
      return tr;
    })
  );
  drawMesh(view.servers);
  if (c.results && $("results").hidden) void showResults();
}
var SVG = "http://www.w3.org/2000/svg";
function drawMesh(servers) {
  const svg = $("mesh");
  const [cx, cy, r] = [160, 120, 85];
  const at = /* @__PURE__ */ new Map();
  servers.forEach((s, i) => {
    const angle = 2 * Math.PI * i / Math.max(1, servers.length) - Math.PI / 2;
    at.set(s.id, [cx + r * Math.cos(angle), cy + r * Math.sin(angle)]);
  });
  const shapes = [];
  const drawn = /* @__PURE__ */ new Set();
  for (const s of servers) {
    for (const link of s.stats?.peer_links ?? []) {
      const pair = [s.id, link.id].sort().join(" ");
      const a = at.get(s.id);
      const b = at.get(link.id);
      if (drawn.has(pair) || !a || !b) continue;
      drawn.add(pair);
      const line2 = document.createElementNS(SVG, "line");
      line2.setAttribute("x1", String(a[0]));
      line2.setAttribute("y1", String(a[1]));
      line2.setAttribute("x2", String(b[0]));
      line2.setAttribute("y2", String(b[1]));
      line2.setAttribute("stroke", "#8a94a6");
      line2.setAttribute("stroke-width", "2");
      shapes.push(line2);
    }
  }
  for (const s of servers) {
    const [x, y] = at.get(s.id) ?? [cx, cy];
    const [, cls] = state(s);
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", String(x));
    dot.setAttribute("cy", String(y));
    dot.setAttribute("r", "14");
    dot.setAttribute("fill", cls === "ok" ? "#22a559" : cls === "warn" ? "#d97706" : "#dc2626");
    dot.setAttribute("data-server", s.id);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", String(x));
    label.setAttribute("y", String(y + 30));
    label.setAttribute("text-anchor", "middle");
    label.setAttribute("font-size", "11");
    label.textContent = `${s.id} (${s.stats?.clients ?? s.clients})`;
    shapes.push(dot, label);
  }
  svg.replaceChildren(...shapes);
}
async function showResults() {
  const response = await api("/console/api/results");
  if (!response.ok) return;
  const results = await response.json();
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(results, null, 2);
  $("results-body").replaceChildren(pre);
  $("results").hidden = false;
}
var tail;
var tailGeneration = 0;
async function startTail(event) {
  event.preventDefault();
  stopTail();
  const generation = tailGeneration;
  const account = $("tail-account").value.trim();
  const code = $("tail-code").value;
  const role = $("tail-role").value.trim();
  const topic = $("tail-topic").value.trim();
  const status = $("tail-status");
  status.textContent = "connecting…";
  try {
    const client = await Client.connect({
      coordinator: location.origin,
      credentials: account ? { accessCode: { account, code, role } } : { anonymous: true }
    });
    if (generation !== tailGeneration) {
      client.close();
      return;
    }
    tail = client;
    client.on("message", (m) => line(`${m.topic}  ${m.fromAlias}${m.fromRole ? ` (${m.fromRole})` : ""}  ${m.text()}`));
    client.on("disconnected", (e) => line(`-- lost ${e.serverId}: ${e.reason}`));
    client.on("reconnected", (e) => {
      line(`-- back on ${e.serverId}`);
      status.textContent = `watching ${topic} on ${e.serverId}`;
    });
    client.on("dropped", (e) => line(`-- ${e.count} messages dropped`));
    await client.subscribe(topic);
    if (generation !== tailGeneration) return;
    status.textContent = `watching ${topic} on ${client.serverId}`;
    $("tail-stop").disabled = false;
  } catch (e) {
    if (generation !== tailGeneration) return;
    status.textContent = e.message;
    stopTail();
  }
}
function stopTail() {
  tailGeneration++;
  tail?.close();
  tail = void 0;
  $("tail-stop").disabled = true;
}
function line(text) {
  const log = $("tail-log");
  const div = document.createElement("div");
  div.textContent = `${(/* @__PURE__ */ new Date()).toLocaleTimeString()}  ${text}`;
  log.append(div);
  while (log.childElementCount > TAIL_LINES) log.firstElementChild?.remove();
  log.scrollTop = log.scrollHeight;
}
function showLogin(error = "") {
  if (timer !== void 0) clearTimeout(timer);
  $("app").hidden = true;
  $("login").hidden = false;
  $("token-error").textContent = error;
}
function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  void poll();
}
$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value);
  showApp();
});
$("tail-form").addEventListener("submit", (e) => void startTail(e));
$("tail-stop").addEventListener("click", () => {
  stopTail();
  $("tail-status").textContent = "stopped";
});
if (sessionStorage.getItem(TOKEN_KEY)) showApp();

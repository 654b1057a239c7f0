//! MCP content blocks (text, image, audio, embedded resource) and the small binary fixtures the
//! demo tools, resources and prompts return, so each of them builds results the same way.

use base64::Engine as _;
use serde_json::{json, Value};

/// A 1x1 red pixel, as PNG.
pub const RED_PIXEL_PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

pub fn text(text: impl Into<String>) -> Value {
    json!({ "type": "text", "text": text.into() })
}

pub fn image_png() -> Value {
    json!({ "type": "image", "data": RED_PIXEL_PNG_BASE64, "mimeType": "image/png" })
}

pub fn audio_wav() -> Value {
    let data = base64::engine::general_purpose::STANDARD.encode(tone_wav());
    json!({ "type": "audio", "data": data, "mimeType": "audio/wav" })
}

/// An embedded text resource.
pub fn resource_text(uri: &str, mime_type: &str, text: &str) -> Value {
    json!({
        "type": "resource",
        "resource": { "uri": uri, "mimeType": mime_type, "text": text },
    })
}

/// A successful `tools/call` result.
pub fn tool_ok(content: Vec<Value>) -> Value {
    json!({ "content": content, "isError": false })
}

/// A tool that ran and failed: a result (not a JSON-RPC error), so the model can see why.
pub fn tool_error(message: impl Into<String>) -> Value {
    json!({ "content": [text(message)], "isError": true })
}

/// 50 ms of a 440 Hz tone: 8 kHz, mono, 8-bit PCM in a WAV container.
fn tone_wav() -> Vec<u8> {
    const RATE: u32 = 8000;
    let samples: Vec<u8> = (0..RATE / 20)
        .map(|i| {
            let t = f64::from(i) / f64::from(RATE);
            let s = (t * 440.0 * std::f64::consts::TAU).sin();
            // 8-bit WAV samples are unsigned, centred on 128; |s| <= 1 keeps this in 28..=228.
            (128.0 + 100.0 * s).round() as u8
        })
        .collect();
    let data_len = u32::try_from(samples.len()).unwrap_or(u32::MAX);
    let mut wav = Vec::with_capacity(44 + samples.len());
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data_len).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // channels
    wav.extend_from_slice(&RATE.to_le_bytes()); // sample rate
    wav.extend_from_slice(&RATE.to_le_bytes()); // byte rate (1 byte per sample)
    wav.extend_from_slice(&1u16.to_le_bytes()); // block align
    wav.extend_from_slice(&8u16.to_le_bytes()); // bits per sample
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&data_len.to_le_bytes());
    wav.extend_from_slice(&samples);
    wav
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_are_well_formed() {
        let png = base64::engine::general_purpose::STANDARD.decode(RED_PIXEL_PNG_BASE64);
        assert!(png.is_ok_and(|p| p.starts_with(b"\x89PNG\r\n\x1a\n")));
        let wav = tone_wav();
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(wav.len(), 44 + 400);
        assert_eq!(
            u32::from_le_bytes([wav[4], wav[5], wav[6], wav[7]]) as usize,
            wav.len() - 8
        );
    }
}

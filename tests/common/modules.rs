//! Fixture kernel modules built by the tests: real ELF64 x86_64 relocatable objects with the
//! sections `modinfo` and the kernel look at, optionally with a well-formed (but fake) PKCS#7
//! signature trailer, optionally compressed the way Kbuild compresses modules.
//!
//! This file is compiled twice: as `common::modules` in integration tests and as
//! `modinfo::fixture_modules` in the crate's unit tests. It therefore never names the
//! crate; it takes `Compression` from its parent module (`tests/common/mod.rs` re-exports it,
//! and `modinfo.rs` defines it).
#![allow(dead_code)]

use std::io::Write;

use object::write::{Object, StandardSection};
use object::{Architecture, BinaryFormat, Endianness, SectionKind};

use super::Compression;

/// The kernel's `MODULE_SIG_STRING`.
const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";

/// The signer and key the fixture signature names.
pub const FIXTURE_SIGNER: &str = "Fixture signing key";
pub const FIXTURE_KEY_ID: &str = "1A:2B:3C";

#[derive(Clone, Debug)]
pub struct FixtureModule {
    /// File-name form, e.g. `nvidia-uvm`; `name=` is written with underscores, as modpost does.
    pub name: String,
    pub vermagic: String,
    /// File-name form, as modpost writes `depends=`.
    pub depends: Vec<String>,
    pub version: String,
    /// `parmtype=` entries (each also gets a `parm=` description).
    pub parameters: Vec<(String, String)>,
    pub signed: bool,
    /// How the signature names its key (when `signed`).
    pub key: FixtureKey,
    /// `.modinfo` keys to leave out (e.g. `name` to imitate pre-4.13 modules).
    pub omitted_keys: Vec<String>,
    /// Raw `key=value` entries appended to `.modinfo` after the usual ones.
    pub extra_entries: Vec<String>,
    /// Bytes of a large read-only section, to give the module a real module's size (nvidia.ko
    /// is tens of MB); empty for none.
    pub payload: Vec<u8>,
    /// Symbols it exports (written to `__ksymtab_strings`, as `EXPORT_SYMBOL` does).
    pub exports: Vec<String>,
    /// Symbols it uses from elsewhere (undefined `.symtab` entries, as a real call leaves).
    pub imports: Vec<String>,
    /// The ELF machine it is built for.
    pub arch: Architecture,
}

impl FixtureModule {
    pub fn new(name: &str, kver: &str, version: &str) -> Self {
        FixtureModule {
            name: name.to_string(),
            vermagic: format!("{kver} SMP preempt mod_unload modversions "),
            depends: Vec::new(),
            version: version.to_string(),
            parameters: Vec::new(),
            signed: false,
            key: FixtureKey::default(),
            omitted_keys: Vec::new(),
            extra_entries: Vec::new(),
            payload: Vec::new(),
            exports: Vec::new(),
            imports: Vec::new(),
            arch: Architecture::X86_64,
        }
    }

    /// Built for arm64 (`EM_AARCH64`), as for a Grace Hopper host.
    pub fn aarch64(mut self) -> Self {
        self.arch = Architecture::Aarch64;
        self
    }

    /// Export `symbols` (`EXPORT_SYMBOL`).
    pub fn exports(mut self, symbols: &[&str]) -> Self {
        self.exports.extend(symbols.iter().map(|s| s.to_string()));
        self
    }

    /// Call `symbols` defined elsewhere (another module or the kernel), whatever `depends=` says.
    pub fn imports(mut self, symbols: &[&str]) -> Self {
        self.imports.extend(symbols.iter().map(|s| s.to_string()));
        self
    }

    pub fn depends(mut self, deps: &[&str]) -> Self {
        self.depends = deps.iter().map(|d| d.to_string()).collect();
        self
    }

    pub fn signed(mut self) -> Self {
        self.signed = true;
        self
    }

    /// Signed, the signature naming its key by issuer CN and serial (sign-file's default).
    pub fn signed_by(mut self, cn: &str, serial: &[u8]) -> Self {
        self.signed = true;
        self.key = FixtureKey::Serial {
            cn: cn.to_string(),
            serial: serial.to_vec(),
        };
        self
    }

    /// Signed, the signature naming its key by subject key identifier (`sign-file -k`).
    pub fn signed_by_skid(mut self, skid: &[u8]) -> Self {
        self.signed = true;
        self.key = FixtureKey::Skid(skid.to_vec());
        self
    }

    pub fn parameter(mut self, name: &str, ty: &str) -> Self {
        self.parameters.push((name.to_string(), ty.to_string()));
        self
    }

    pub fn without_key(mut self, key: &str) -> Self {
        self.omitted_keys.push(key.to_string());
        self
    }

    /// Pad the module with a `.rodata.fixture` section of `random` pseudo-random
    /// (incompressible) bytes followed by `zeros` zero bytes.
    pub fn padded(mut self, random: usize, zeros: usize, seed: u64) -> Self {
        let mut state = seed | 1;
        let mut payload = Vec::with_capacity(random + zeros);
        while payload.len() < random {
            // xorshift64*: fast, deterministic, and zstd/xz cannot shrink it.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            let n = word.len().min(random - payload.len());
            payload.extend_from_slice(&word[..n]);
        }
        payload.resize(random + zeros, 0);
        self.payload = payload;
        self
    }

    pub fn extra(mut self, entry: &str) -> Self {
        self.extra_entries.push(entry.to_string());
        self
    }

    /// The name the kernel uses (underscores).
    pub fn kernel_name(&self) -> String {
        self.name.replace('-', "_")
    }

    /// The `.ko` file name for `c` (`nvidia-uvm.ko.xz`, …).
    pub fn file_name(&self, c: Compression) -> String {
        match c {
            Compression::None => format!("{}.ko", self.name),
            Compression::Xz => format!("{}.ko.xz", self.name),
            Compression::Zstd => format!("{}.ko.zst", self.name),
        }
    }

    /// The `.modinfo` contents: NUL-terminated `key=value` strings in modpost's usual order,
    /// with the repeated `alias=`/`parm=` entries real NVIDIA modules have.
    pub fn modinfo(&self) -> Vec<u8> {
        let mut entries: Vec<(String, String)> = vec![
            ("version".into(), self.version.clone()),
            ("license".into(), "Dual MIT/GPL".into()),
        ];
        for (parm, ty) in &self.parameters {
            entries.push(("parm".into(), format!("{parm}:Fixture parameter {parm}")));
            entries.push(("parmtype".into(), format!("{parm}:{ty}")));
        }
        entries.extend([
            ("srcversion".into(), self.srcversion()),
            ("alias".into(), "pci:v000010DEd*sv*sd*bc03sc00i00*".into()),
            ("alias".into(), "pci:v000010DEd*sv*sd*bc03sc02i00*".into()),
            ("depends".into(), self.depends.join(",")),
            ("retpoline".into(), "Y".into()),
            ("name".into(), self.kernel_name()),
            ("vermagic".into(), self.vermagic.clone()),
        ]);
        let mut out = Vec::new();
        for (key, value) in entries {
            if !self.omitted_keys.contains(&key) {
                out.extend_from_slice(format!("{key}={value}\0").as_bytes());
            }
        }
        for entry in &self.extra_entries {
            out.extend_from_slice(entry.as_bytes());
            out.push(0);
        }
        out
    }

    /// A stable 23-character upper-case hex `srcversion`, derived from name and version.
    fn srcversion(&self) -> String {
        // FNV-1a, twice with different seeds: deterministic across Rust versions.
        let fnv = |seed: u64| {
            let mut h = seed;
            for b in self.name.bytes().chain(self.version.bytes()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01B3);
            }
            h
        };
        let hex = format!(
            "{:016X}{:016X}",
            fnv(0xCBF2_9CE4_8422_2325),
            fnv(0x8422_2325_CBF2_9CE4)
        );
        hex[..23].to_string()
    }

    /// The uncompressed module file: ELF, plus the signature trailer when signed.
    pub fn elf_bytes(&self) -> Vec<u8> {
        let mut obj = Object::new(BinaryFormat::Elf, self.arch, Endianness::Little);

        let text = obj.section_id(StandardSection::Text);
        let code: &[u8] = match self.arch {
            // mov w0, #0; ret
            Architecture::Aarch64 => &[0x00, 0x00, 0x80, 0x52, 0xC0, 0x03, 0x5F, 0xD6],
            // endbr64; xor eax, eax; ret
            _ => &[0xF3, 0x0F, 0x1E, 0xFA, 0x31, 0xC0, 0xC3],
        };
        obj.append_section_data(text, code, 16);

        let modinfo = obj.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyData);
        obj.append_section_data(modinfo, &self.modinfo(), 1);

        // struct module on x86_64: state (4) + pad (4) + list_head (16), then name[56].
        let mut this_module = vec![0u8; 0x500];
        let name = self.kernel_name();
        let name_bytes = &name.as_bytes()[..name.len().min(55)];
        this_module[24..24 + name_bytes.len()].copy_from_slice(name_bytes);
        let section = obj.add_section(
            Vec::new(),
            b".gnu.linkonce.this_module".to_vec(),
            SectionKind::Data,
        );
        obj.append_section_data(section, &this_module, 64);

        if !self.payload.is_empty() {
            let section = obj.add_section(
                Vec::new(),
                b".rodata.fixture".to_vec(),
                SectionKind::ReadOnlyData,
            );
            obj.append_section_data(section, &self.payload, 64);
        }

        if !self.exports.is_empty() {
            let strings: Vec<u8> = self
                .exports
                .iter()
                .flat_map(|name| name.bytes().chain([0]))
                .collect();
            let section = obj.add_section(
                Vec::new(),
                b"__ksymtab_strings".to_vec(),
                SectionKind::ReadOnlyString,
            );
            obj.append_section_data(section, &strings, 1);
        }
        for name in &self.imports {
            obj.add_symbol(object::write::Symbol {
                name: name.as_bytes().to_vec(),
                value: 0,
                size: 0,
                kind: object::SymbolKind::Text,
                scope: object::SymbolScope::Linkage,
                weak: false,
                section: object::write::SymbolSection::Undefined,
                flags: object::SymbolFlags::None,
            });
        }

        let mut bytes = obj.write().expect("writing fixture ELF");
        if self.signed {
            append_signature(&mut bytes, &self.key);
        }
        bytes
    }

    pub fn bytes(&self, c: Compression) -> Vec<u8> {
        match c {
            Compression::None => self.elf_bytes(),
            Compression::Xz => self.bytes_xz(),
            Compression::Zstd => self.bytes_zstd(),
        }
    }

    /// Compressed like Kbuild does: `xz --check=crc32 --lzma2=dict=1MiB`.
    pub fn bytes_xz(&self) -> Vec<u8> {
        let mut options = xz2::stream::LzmaOptions::new_preset(6).expect("xz preset");
        options.dict_size(1 << 20);
        let mut filters = xz2::stream::Filters::new();
        filters.lzma2(&options);
        let stream = xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32)
            .expect("xz encoder");
        let mut encoder = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
        encoder.write_all(&self.elf_bytes()).expect("xz compress");
        encoder.finish().expect("xz finish")
    }

    /// Compressed like Kbuild does: `zstd` at its default level.
    pub fn bytes_zstd(&self) -> Vec<u8> {
        zstd::encode_all(&self.elf_bytes()[..], 3).expect("zstd compress")
    }
}

/// How a fixture signature names the signing key (the SignerInfo's `sid`).
#[derive(Clone, Debug)]
pub enum FixtureKey {
    /// `issuerAndSerialNumber`: an issuer `O=Fixture, CN=cn` and the serial's bytes.
    Serial { cn: String, serial: Vec<u8> },
    /// `[0] subjectKeyIdentifier`.
    Skid(Vec<u8>),
}

impl Default for FixtureKey {
    fn default() -> Self {
        FixtureKey::Serial {
            cn: FIXTURE_SIGNER.to_string(),
            serial: vec![0x1A, 0x2B, 0x3C],
        }
    }
}

/// Appends a fake-but-well-formed PKCS#7 signature, `struct module_signature` and the magic.
fn append_signature(bytes: &mut Vec<u8>, key: &FixtureKey) {
    let der = fixture_pkcs7(key);
    append_trailer(bytes, &der);
}

/// Appends `der` as the module's signature: the DER, `struct module_signature`, the magic.
pub fn append_trailer(bytes: &mut Vec<u8>, der: &[u8]) {
    bytes.extend_from_slice(der);
    // algo, hash, id_type = PKEY_ID_PKCS7, signer_len, key_id_len, pad[3], then __be32 sig_len.
    bytes.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
    bytes.extend_from_slice(&(der.len() as u32).to_be_bytes());
    bytes.extend_from_slice(SIG_MAGIC);
}

/// A DER TLV with a definite length.
pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let len_bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | len_bytes.len() as u8);
        out.extend(len_bytes);
    }
    out.extend_from_slice(contents);
    out
}

/// ContentInfo { signedData, SignedData { version 1, digestAlgorithms { sha256 },
/// contentInfo { data }, signerInfos { SignerInfo { version 1, issuerAndSerialNumber {
/// CN="Fixture signing key", serial 0x1A2B3C } (or the key's), sha256, rsaEncryption,
/// encryptedDigest } } } }, shaped like `scripts/sign-file` output (detached, no
/// certificates; with `-k`, SignerInfo version 3 and a subject key identifier).
fn fixture_pkcs7(key: &FixtureKey) -> Vec<u8> {
    const SEQ: u8 = 0x30;
    const SET: u8 = 0x31;
    const INT: u8 = 0x02;
    const OID: u8 = 0x06;
    const NULL: &[u8] = &[0x05, 0x00];
    let oid_signed_data = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x02];
    let oid_data = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x01];
    let oid_sha256 = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
    let oid_rsa = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01];
    let oid_org = [0x55, 0x04, 0x0A];
    let oid_cn = [0x55, 0x04, 0x03];

    let sha256 = tlv(SEQ, &[tlv(OID, &oid_sha256), NULL.to_vec()].concat());
    let rdn = |oid: &[u8], value: &str| {
        tlv(
            SET,
            &tlv(SEQ, &[tlv(OID, oid), tlv(0x0C, value.as_bytes())].concat()),
        )
    };
    let (version, sid) = match key {
        FixtureKey::Serial { cn, serial } => {
            let issuer = tlv(SEQ, &[rdn(&oid_org, "Fixture"), rdn(&oid_cn, cn)].concat());
            (1, tlv(SEQ, &[issuer, tlv(INT, serial)].concat()))
        }
        FixtureKey::Skid(skid) => (3, tlv(0x80, skid)),
    };
    let signer_info = tlv(
        SEQ,
        &[
            tlv(INT, &[version]),
            sid,
            sha256.clone(),
            tlv(SEQ, &[tlv(OID, &oid_rsa), NULL.to_vec()].concat()),
            tlv(0x04, &[0x5A; 256]), // encryptedDigest: an RSA-2048-sized blob
        ]
        .concat(),
    );
    let signed_data = tlv(
        SEQ,
        &[
            tlv(INT, &[1]),
            tlv(SET, &sha256),
            tlv(SEQ, &tlv(OID, &oid_data)),
            tlv(SET, &signer_info),
        ]
        .concat(),
    );
    tlv(
        SEQ,
        &[tlv(OID, &oid_signed_data), tlv(0xA0, &signed_data)].concat(),
    )
}

package recipe

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"testing"

	"github.com/opencontainers/go-digest"
)

var updateGolden = flag.Bool("update-golden", false, "print new golden digests instead of failing")

// goldenDigests pin the encoders' exact output on genTar(t, 1<<20) with a
// fixed header. A mismatch means Go (compress/flate) or klauspost/compress
// changed output: stored recipes may no longer reproduce their blobs. Do not
// just update the constants; see the package comment.
var goldenDigests = map[string]string{
	"gzip/go/0":                           "ba5d10146d3fe62332faff6e52f7c63cb9c509e9002153a642669f8a1d9018f3",
	"gzip/klauspost/0":                    "f9eb957ab155a92958f0f87e72952c216d1aea340a66134b51bf72d4e1b066a7",
	"gzip/go/1":                           "447c01682310702696f7a2cae32d5aa06cc278aadbcbb5f078a9393e43b2fd86",
	"gzip/go/2":                           "485045d1bfd96e33336547474425a54daf5005e7fc6e4960a44604357484ce22",
	"gzip/go/3":                           "f29855fbad1fd7ec896e3a3c0243e769c6e6313029a021457c7dbb091c8bfffe",
	"gzip/go/4":                           "0a540a443e08b744253521ccd2991894537323ec1ed188f3d2761f3fff0b6a0b",
	"gzip/go/5":                           "ba16e83f2cea353e2675df8c4bc544d8363dc0f45a503d91c6aea3946eb6388a",
	"gzip/go/6":                           "df69a9d17aa12e0de4696e5a63d952f392c275178103c900a37369ce65f71b41",
	"gzip/go/7":                           "cdec9e7038ac572c9a9f7a0e59ae98ae028d0d084071eb182564f33ab622919f",
	"gzip/go/8":                           "06f8d398a56c9b7aa286254b6b5f188065b3779ae7da8f094a90a0742e209abb",
	"gzip/go/9":                           "60de196d8356c9ad18d1ef7d1d785ee04711b5ea9afadebd40c650c7c11cd95a",
	"gzip/klauspost/1":                    "62815a54062b6fde28c801e6f8e1f89ca2e9bbe11e7ef841d0b1334ce3342822",
	"gzip/klauspost/2":                    "cce1e4dab49cbaeb31001c8f88bb5edf9ecbb5d9ba35b2f06f2979f0c6c5877e",
	"gzip/klauspost/3":                    "25387799bbe5704e7e8d0fda790b038133130b34b5eb1487b78c0a9c306cfb85",
	"gzip/klauspost/4":                    "12d398f13b7f456d250bf0248d197bf92a573b1be2da84426d0aa736c7ec9671",
	"gzip/klauspost/5":                    "a1f16e4cd28302d030a43b076d5162ed142af0949ea9ecab5bce104498080638",
	"gzip/klauspost/6":                    "1b893df73480679590526d8fc70b748ac053527bf006d16795b1d9fb68d76ee9",
	"gzip/klauspost/7":                    "1c6a4677131574619f7a198e5911f45709d25927965028e73ebe759cfbd428d3",
	"gzip/klauspost/8":                    "fdf105b7f2934b45dac2895ea01e7ff059d677bd02162b376034ef2ee3637e26",
	"gzip/klauspost/9":                    "1c90137b578f2e9986a5ee3b10c7e44a12e5a372584d2cc9c5d6f5027c0c9fb8",
	"zstd/klauspost/1/crc=true/window=0":  "ec5308a2ef33c1eab6588b3d8c1879be4cb1dd1110248717f1d5705e6c1efc53",
	"zstd/klauspost/1/crc=false/window=0": "ac098bb1fa6f5537644a3b3243182c1fa1115d5a640bd0b01a7af9df37644f0d",
	"zstd/klauspost/2/crc=true/window=0":  "93043ff5ec8fe620cda761025f5183537b3ad24082b9800745f6ac54366899d1",
	"zstd/klauspost/2/crc=false/window=0": "2b8ebe057cfef7cf7cf5d11fb155058fbfb213b100a1b317cce614691c5aa1d1",
	"zstd/klauspost/3/crc=true/window=0":  "2485d8bbd719fdda55063b81bb335b2aed65bc06f5067af1d8bbf143953b42c9",
	"zstd/klauspost/3/crc=false/window=0": "101d257e9e2a7f8be244c419dadef15a643364293aba5c32a277cf9f4a7d8a98",
	"zstd/klauspost/4/crc=true/window=0":  "fa0505b5a033b518fd585ea5e68e60d915f309a9630b568690f3a4183a570772",
	"zstd/klauspost/4/crc=false/window=0": "bf7a54e4b4504151a6755f2900dbaa36851cbc65782492799137532e05c9879e",
	"zstd/klauspost/1/crc=true/window=4194304/window-first":   "3f3b2585c1db1fa22acc75d546df7de113a5e5310c3914ec46dbe7026fb209bb",
	"zstd/klauspost/1/crc=true/window=1048576/window-first":   "20514e1348ee83db570a4cfa1da3824291f684d7207fdf852bb7124a0ba2f863",
	"zstd/klauspost/2/crc=true/window=0/content-size=1057280": "7cd63b1f2feb394dc55dc8be47d50e209c2e629a8121e9dd33821f0cc1db0301",
}

func goldenRecipes() []*Recipe {
	hdr := []byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255}
	var rs []*Recipe
	for _, enc := range []string{encGoFlate, encKPFlate} {
		for l := 0; l <= 9; l++ {
			rs = append(rs, &Recipe{Format: FormatGzip, enc: enc, level: l, header: hdr})
		}
	}
	for l := 1; l <= 4; l++ {
		for _, crc := range []bool{true, false} {
			rs = append(rs, &Recipe{Format: FormatZstd, enc: encKPZstd, level: l, zopt: zstdOptions{CRC: crc}})
		}
	}
	// Option order at SpeedFastest (128 KiB blocks) and a streamed frame
	// with a content size (len(genTar(t, 1<<20))).
	rs = append(rs,
		&Recipe{Format: FormatZstd, enc: encKPZstd, level: 1, zopt: zstdOptions{CRC: true, Window: 4 << 20, WindowFirst: true}},
		&Recipe{Format: FormatZstd, enc: encKPZstd, level: 1, zopt: zstdOptions{CRC: true, Window: 1 << 20, WindowFirst: true}},
		&Recipe{Format: FormatZstd, enc: encKPZstd, level: 2, zopt: zstdOptions{CRC: true, ContentSize: goldenInputSize}},
	)
	return rs
}

func TestGoldenDigests(t *testing.T) {
	tb := genTar(t, 1<<20)
	if got := digest.FromBytes(tb).String(); got != goldenInput && !*updateGolden {
		t.Fatalf("generated input changed: %s", got)
	}
	var out bytes.Buffer
	for _, r := range goldenRecipes() {
		var buf bytes.Buffer
		if err := r.Apply(context.Background(), &buf, bytes.NewReader(tb)); err != nil {
			t.Fatal(err)
		}
		got := digest.FromBytes(buf.Bytes()).Encoded()
		fmt.Fprintf(&out, "\t%q: %q,\n", r.Encoder(), got)
		if !*updateGolden && goldenDigests[r.Encoder()] != got {
			t.Errorf("%s: output digest %s, pinned %s: encoder behaviour changed", r.Encoder(), got, goldenDigests[r.Encoder()])
		}
	}
	if *updateGolden {
		t.Logf("input %s\n%s", digest.FromBytes(tb), out.String())
	}
}

// goldenInputSize is len(genTar(t, 1<<20)).
const goldenInputSize = 1057280

const goldenInput = "sha256:3cac466bf9c7443435664147f5c595f5feeec2d4128144eb1a8c8779b13e738b"

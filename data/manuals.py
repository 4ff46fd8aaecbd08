"""Quality manuals (PDF) for the sample products, written with PyMuPDF.

One English manual per product and a Korean manual for brick. Page plan
(8 pages, one numbered section per page):

1. Scope (title page)            2. Inspection overview and acceptance criteria
3.-7. one page per defect type, heading ``"{n}. {Defect} ({Korean})"`` (Korean
   manual: ``"{n}. {Korean} ({Defect})"``) with a short description and the
   sub-sections ``Cause`` / ``Immediate action`` / ``Prevention`` (Korean:
   ``원인`` / ``즉시 조치`` / ``예방``), each heading on its own line
8. Escalation and records

Every page has the footer ``"<Title> — page N of M"``. PDF metadata: title,
``subject`` = product id, ``keywords`` = ``"product=<id>;lang=<en|ko>"``.
Latin text uses Helvetica; any line containing Hangul uses the CJK font built
into PyMuPDF (Droid Sans Fallback, ``pymupdf.Font("korea")``), written with a
``TextWriter`` so that ``page.get_text()`` returns the text unchanged. Fonts are
subset before saving (``Document.subset_fonts``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from core.catalog import product_info
from core.settings import DEFECT_TYPES, PRODUCTS

if TYPE_CHECKING:
    import pymupdf

SUBHEADINGS = {"en": ("Cause", "Immediate action", "Prevention"), "ko": ("원인", "즉시 조치", "예방")}
DEFECT_NAMES = {
    "scratch": ("Scratch", "스크래치"),
    "crack": ("Crack", "균열"),
    "hole": ("Hole", "구멍"),
    "stain": ("Stain", "얼룩"),
    "contamination": ("Contamination", "이물질"),
}
FIRST_DEFECT_SECTION = 3
MANUAL_LANGS = {"brick": ("en", "ko"), "gravel": ("en",), "grass": ("en",)}

_HANGUL = re.compile(r"[\u1100-\u11ff\u3130-\u318f\uac00-\ud7af]")
_PAGE_W, _PAGE_H = 595.0, 842.0  # A4 in points
_MARGIN = 56.0

# --------------------------------------------------------------------------- content

_CONTENT: dict[tuple[str, str], dict] = {}

_CONTENT[("brick", "en")] = {
    "title": "Clay Facing Brick Panel Quality Manual",
    "doc": "Document QM-BRK-EN, revision 3. Applies to prefabricated clay facing brick panels, stretcher bond, "
           "10 mm recessed cement-lime mortar joints.",
    "scope": [
        "This manual tells line inspectors and shift leads how to recognise, contain and prevent surface defects "
        "on prefabricated clay facing brick panels before they leave the panel plant.",
        "It covers the exposed face of the bricks and the mortar joints. Structural checks of the steel frame, "
        "lifting anchors and panel dimensions are covered by the structural inspection plan and are not repeated here.",
        "Each defect type has its own page with the usual causes, the immediate action at the station and the "
        "preventive measures. Cite the page number when you write a deviation report.",
    ],
    "overview": [
        "Inspect every panel face at the final inspection station under diffuse daylight-balanced light of at "
        "least 1000 lux, viewing from 1 m at right angles and then at a raking angle of about 30 degrees.",
        "The camera station photographs the panel in 256 x 256 pixel tiles; the anomaly score flags tiles for a "
        "human check. A flagged tile is never released without the inspector's decision.",
    ],
    "criteria": [
        "Scratches: none longer than 30 mm or visible from 3 m on the face of a brick; mortar scuffs below 50 mm accepted.",
        "Cracks: no crack through a brick or along a bed joint; hairline firing cracks under 0.2 mm and 20 mm accepted.",
        "Holes and pits: no pit deeper than 3 mm or wider than 6 mm; lime blow-outs are always rejected.",
        "Stains: no stain visible from 3 m after dry brushing; efflorescence that brushes off is recorded, not rejected.",
        "Contamination: no mortar smears, paint, timber or metal particles left on the face.",
    ],
    "defects": {
        "scratch": {
            "desc": "A thin straight or slightly curved line across the brick face, lighter than the fired skin where "
                    "the surface was scraped, or darker where dirt was pressed in.",
            "cause": [
                "Panels dragged across each other or across the steel stacking frame without timber bearers.",
                "Trowels, jointing irons or steel brushes slipping off the joint during pointing.",
                "Grit trapped under the rubber pads of the vacuum lifter when the panel is picked up.",
            ],
            "action": [
                "Stop stacking on the affected frame and check the next three panels from the same frame.",
                "Measure the scratch; if it is longer than 30 mm or breaks the fired skin, mark the tile and hold the panel.",
                "Light scuffs on the skin may be blended with a stiff nylon brush and brick dust of the same batch only.",
            ],
            "prevention": [
                "Use timber bearers and corner protectors on every stacking frame; replace worn bearers weekly.",
                "Clean the vacuum lifter pads at the start of every shift and after every tenth lift.",
                "Train pointers to keep jointing tools inside the joint; use plastic-faced jointers on facing work.",
            ],
        },
        "crack": {
            "desc": "A jagged dark line, often branching, running through a brick or along the mortar joint; its "
                    "width changes along its length.",
            "cause": [
                "Thermal shock or uneven cooling in the kiln, which leaves firing cracks in single bricks.",
                "Panel lifted or tilted before the mortar reached the strength required for handling (7 MPa).",
                "Shrinkage of over-wet mortar, or frost acting on panels cured outdoors below 5 degrees Celsius.",
            ],
            "action": [
                "Hold the panel; do not lift it again until quality control has assessed the crack.",
                "Record crack length and maximum width with a crack-width card; photograph it with a scale.",
                "A crack through a brick or longer than 20 mm rejects the panel; inform the shift lead at once.",
            ],
            "prevention": [
                "Check the kiln cooling curve of every delivered brick batch and reject batches with firing cracks above 2 %.",
                "Keep panels on the curing bed until cube tests confirm the handling strength.",
                "Control mortar water content by the batching sheet and protect curing panels from frost and draughts.",
            ],
        },
        "hole": {
            "desc": "A dark pit or cavity with a shaded rim in the brick face, round or elongated, from pinholes to "
                    "several millimetres across.",
            "cause": [
                "Lime inclusions in the clay that hydrate after firing and blow out a cone of the face (lime popping).",
                "Air voids or stones in the clay column that open up when the face is textured.",
                "Missing mortar at a joint crossing, leaving an open void in the joint.",
            ],
            "action": [
                "Probe the pit with a depth gauge; reject the panel if it is deeper than 3 mm or wider than 6 mm.",
                "If a white core is visible at the bottom of the pit, treat it as a lime blow-out and hold the whole brick batch.",
                "Open joint voids may be re-pointed the same day with the panel's own mortar mix.",
            ],
            "prevention": [
                "Require the brick supplier's lime-popping test (steam test) result for every batch.",
                "Inspect bricks at unloading and set aside units with pits or white specks.",
                "Fill joints fully and tool them when thumb-print hard; check joint crossings at the pointing station.",
            ],
        },
        "stain": {
            "desc": "A diffuse discoloured patch with soft edges: white efflorescence salts, brown rust run-off, "
                    "dark damp patches or green algae.",
            "cause": [
                "Soluble salts carried to the face by water drying out of fresh mortar (efflorescence).",
                "Rust from unprotected steel lintels, ties or the stacking frame washed onto the face.",
                "Panels stored without covers so rain or cleaning water dries unevenly; release oil splashed from moulds.",
            ],
            "action": [
                "Let the panel dry, then dry-brush the stain; efflorescence that brushes off is recorded, not rejected.",
                "Rust or oil stains that remain are marked and the panel is held for cleaning by the finishing team.",
                "Never wash the face with acid on the line; acid cleaning is done only by the finishing team to the method statement.",
            ],
            "prevention": [
                "Cover stored panels at the top and sides so that water cannot run down the face.",
                "Use galvanised or stainless ties and lintels, and keep steel off the brick face during storage.",
                "Use low-alkali cement and clean mixing water; keep mould oil away from the facing side.",
            ],
        },
        "contamination": {
            "desc": "Foreign matter on the face: mortar splashes, paint flecks, soot, timber chips or fibres, with a "
                    "colour and texture unlike the fired clay.",
            "cause": [
                "Mortar dropped or splashed on the face during pointing and left to harden.",
                "Overspray from marking paint, soot from forklift exhausts, or timber debris from broken bearers.",
                "Dust and fibres from the curing covers sticking to a face that is still damp.",
            ],
            "action": [
                "Remove loose debris with a soft brush and compressed air at no more than 2 bar.",
                "Hardened mortar splashes are marked and removed by the finishing team with a plastic scraper, never a steel tool.",
                "Record the source if it is known (paint, soot, mortar) so that the line can remove it.",
            ],
            "prevention": [
                "Protect the finished face with a board while pointing adjacent joints; clean splashes within 30 minutes.",
                "Keep marking paint and diesel forklifts out of the facing bay.",
                "Replace frayed curing covers and store them off the floor.",
            ],
        },
    },
    "closing_heading": "Escalation and records",
    "closing": [
        "Escalate to the quality engineer at once when a panel is rejected for a crack or a lime blow-out, when the same "
        "defect appears on three panels in one shift, or when the cause is not clear.",
        "Record every held or rejected panel in the deviation log with the panel number, the defect type, the tile "
        "image, the anomaly score and the page of this manual that was applied.",
        "Held panels are tagged red and moved to the quarantine bay. Only the quality engineer may release them.",
        "Keep inspection records for ten years with the panel's production file.",
    ],
}

_CONTENT[("gravel", "en")] = {
    "title": "Exposed-Aggregate Concrete Panel Quality Manual",
    "doc": "Document QM-GRV-EN, revision 2. Applies to precast concrete panels with an exposed 8-16 mm crushed "
           "granite aggregate face, retarder-washed.",
    "scope": [
        "This manual covers the visual quality of the exposed-aggregate face of precast panels after washing, "
        "curing and before dispatch to site.",
        "It applies to the face aggregate, the cement matrix between the stones and the arrises. Reinforcement "
        "cover, lifting inserts and dimensions are checked under the precast inspection and test plan.",
        "One page per defect type gives the causes, the immediate action and the prevention. Quote the page "
        "number in non-conformance reports.",
    ],
    "overview": [
        "Inspect the washed face when it is surface-dry, under diffuse light of at least 750 lux, from 2 m and then "
        "close up at a raking angle.",
        "Compare every panel with the approved reference panel for aggregate exposure depth, colour and density. "
        "The camera tiles flagged by the anomaly score are checked by the inspector before release.",
    ],
    "criteria": [
        "Scratches: no scratch in the cement matrix longer than 50 mm; scratched stones accepted if not visible from 3 m.",
        "Cracks: no crack wider than 0.15 mm; any crack crossing the panel or following reinforcement is rejected.",
        "Holes: aggregate pop-outs and blowholes deeper than 5 mm or wider than 10 mm are rejected.",
        "Stains: face colour within the reference panel range when viewed from 3 m in daylight.",
        "Contamination: no wood, plastic, soot or leaf debris embedded in the matrix.",
    ],
    "defects": {
        "scratch": {
            "desc": "A thin light line across the stones and the cement matrix, usually straight, where a hard object "
                    "has scored the exposed face.",
            "cause": [
                "Steel brushes or scrapers used too hard when the retarded surface layer is removed.",
                "Lifting chains or straps touching the face during demoulding and turning.",
                "Panels slid on the storage A-frame without rubber packers.",
            ],
            "action": [
                "Check whether the scratch cuts the cement matrix or only marks the stones; matrix scratches over 50 mm are held.",
                "Stop using the tool or strap that caused it and inspect the two previous panels.",
                "Minor marks on stones may be left; note them on the panel card.",
            ],
            "prevention": [
                "Wash the face with a pressure washer at the set pressure instead of brushing with steel.",
                "Use soft slings and edge protectors at demoulding; train the crane crew on face protection.",
                "Fit rubber packers to every A-frame and check them at the start of each shift.",
            ],
        },
        "crack": {
            "desc": "A dark jagged line running through the cement matrix between the stones, sometimes branching "
                    "around aggregate particles.",
            "cause": [
                "Early-age thermal or plastic shrinkage when the panel dries too fast after washing.",
                "Demoulding or lifting before the concrete reaches the stripping strength (15 MPa).",
                "Restraint from the mould at corners and openings, or reinforcement placed with too little cover.",
            ],
            "action": [
                "Hold the panel and measure the crack width with a crack microscope or card.",
                "Cracks wider than 0.15 mm or running across the panel are rejected and reported to the production manager.",
                "Mark both crack ends with a pencil and date so that growth can be checked after 24 hours.",
            ],
            "prevention": [
                "Cure the face with a curing compound or wet hessian immediately after washing.",
                "Release panels only on cube results; log the stripping strength for every casting.",
                "Check cover spacers and mould corner details before every pour.",
            ],
        },
        "hole": {
            "desc": "A dark cavity in the face: a socket left by a lost stone (pop-out) or a blowhole in the cement "
                    "matrix with a shaded rim.",
            "cause": [
                "Aggregate washed out because the retarder was too strong or the wash came too late.",
                "Trapped air against the mould face from insufficient vibration.",
                "Absorbent or weak particles in the aggregate that break out after curing.",
            ],
            "action": [
                "Measure the size and depth of the cavity; reject above 10 mm across or 5 mm deep.",
                "Count cavities per square metre; more than three accepted cavities per square metre also rejects the panel.",
                "Small cavities may be repaired with the approved colour-matched mortar and stones of the same grading.",
            ],
            "prevention": [
                "Check retarder dosage and wash timing on a trial area before washing the whole panel.",
                "Vibrate in layers and run the poker along the mould face.",
                "Sieve and inspect the face aggregate at delivery; reject lots with soft or absorbent particles.",
            ],
        },
        "stain": {
            "desc": "A diffuse patch darker or differently coloured than the face: oil, rust, cement laitance, damp or "
                    "tannin from timber.",
            "cause": [
                "Too much mould release oil, or oil dripping from the crane or the vibrator.",
                "Cement laitance not fully washed off, leaving a grey film over the stones.",
                "Rust from reinforcement offcuts or tie wire left on the face; tannin from wet timber packers.",
            ],
            "action": [
                "Let the face dry and compare the patch with the reference panel from 3 m.",
                "Oil and rust stains that remain visible are marked and the panel held for cleaning.",
                "Do not apply acid or solvent at the line; cleaning follows the approved method statement.",
            ],
            "prevention": [
                "Apply release agent with a calibrated sprayer and wipe off surplus from the mould.",
                "Wash the face until the run-off water is clear; check the stones are clean before curing.",
                "Sweep tie wire and offcuts from the casting bed; use plastic packers instead of timber.",
            ],
        },
        "contamination": {
            "desc": "Foreign objects embedded in or lying on the face: wood chips, plastic fragments, soot or leaf "
                    "litter, with a colour unlike the stones.",
            "cause": [
                "Debris left in the mould or blown into it before casting.",
                "Plastic from aggregate bags or spacer packaging falling into the mix.",
                "Leaves and soot settling on panels cured in the open yard.",
            ],
            "action": [
                "Remove loose matter with a soft brush and water; do not dig embedded pieces out with a steel tool.",
                "Embedded pieces larger than 5 mm are marked; the panel is held for repair.",
                "Report the type of material so that its source can be traced.",
            ],
            "prevention": [
                "Blow out and inspect every mould before casting; sign the pre-pour checklist.",
                "Open aggregate bags away from the mixer and collect packaging at once.",
                "Cover curing panels in the yard and keep the yard swept.",
            ],
        },
    },
    "closing_heading": "Escalation and records",
    "closing": [
        "Escalate to the quality manager when a panel is rejected for a crack, when the face colour falls outside the "
        "reference range, or when a defect repeats on consecutive castings.",
        "Record each held or rejected panel in the non-conformance register with the panel mark, casting date, defect "
        "type, photograph of the flagged tile and the page of this manual that was used.",
        "Repairs are made only to an approved repair procedure and re-inspected against the reference panel.",
        "Records are kept with the precast production records for the design life stated in the contract.",
    ],
}

_CONTENT[("grass", "en")] = {
    "title": "Artificial Turf Mat Quality Manual",
    "doc": "Document QM-TRF-EN, revision 4. Applies to tufted polyethylene artificial turf mats, 40 mm pile, "
           "latex-coated backing, supplied in 4 m rolls.",
    "scope": [
        "This manual covers the visual inspection of artificial turf mats at the end of the tufting and coating "
        "line and before rolling.",
        "It applies to the pile blades, the tuft rows and the visible backing. Tuft bind, weight and dimensions are "
        "tested in the laboratory to the product specification.",
        "One page per defect type gives the causes, the immediate action and the prevention. Quote the page number "
        "in the roll report.",
    ],
    "overview": [
        "Inspect the mat on the inspection table under 1000 lux with the pile brushed up, looking along the rows and "
        "then across them.",
        "The line camera scores each 256 x 256 pixel tile; flagged tiles are checked by the inspector, who decides to "
        "pass, repair or cut out the section.",
    ],
    "criteria": [
        "Scratches: no line of flattened or cut blades longer than 100 mm.",
        "Cracks: no crack or split in the backing coating; no visible gap in the tuft rows.",
        "Holes: no missing tufts over 10 mm, no burn or puncture holes through the backing.",
        "Stains: no oil, mud or paint stain visible from 2 m; colour within the shade band of the order.",
        "Contamination: no loose litter, sand or rubber granules on the pile before rolling; no foreign fibres tufted in.",
    ],
    "defects": {
        "scratch": {
            "desc": "A thin straight line of flattened, scuffed or cut blades that looks lighter or darker than the "
                    "surrounding pile.",
            "cause": [
                "A damaged or misaligned doctor blade or guide bar dragging over the pile.",
                "Mats pulled over sharp edges of the inspection table or the cutting bench.",
                "Pile crushed by a forklift tine or a strap during roll handling.",
            ],
            "action": [
                "Stop the line if the scratch repeats at the same position across the width, and check the guide bars.",
                "Brush the pile up; if blades are cut, mark the section for cut-out.",
                "Flattened blades that recover after brushing are recorded only.",
            ],
            "prevention": [
                "Inspect doctor blades and guide bars at each product change and replace worn parts.",
                "Fit edge protection to tables and benches.",
                "Handle rolls only with the roll clamp; never drag mats across the floor.",
            ],
        },
        "crack": {
            "desc": "A dark jagged split in the latex coating or a branching gap between tuft rows where the backing "
                    "shows through.",
            "cause": [
                "Latex coating over-cured or applied too thin, so the backing becomes brittle.",
                "Mats rolled too tightly or folded while cold, cracking the coating.",
                "Backing fabric damaged at the tufting needles, opening into a split under tension.",
            ],
            "action": [
                "Hold the roll and flex the affected area gently to see whether the split grows.",
                "Any split in the backing is cut out; record the length and position from the roll start.",
                "Check the coating weight and oven temperature log for the affected length.",
            ],
            "prevention": [
                "Control coating weight by weighing samples every hour; keep the oven on its set profile.",
                "Roll mats on 150 mm cores and never below 10 degrees Celsius.",
                "Check needle condition and backing tension at every shift change.",
            ],
        },
        "hole": {
            "desc": "A dark gap in the pile: missing tufts, a burn or a puncture through the backing, round or "
                    "elongated, with a shaded edge.",
            "cause": [
                "Broken or missing needle, or yarn breaks, leaving tufts out.",
                "Hot particles from the drying oven or smoking near the line melting the polyethylene.",
                "Punctures from sharp objects on the inspection table or during transport.",
            ],
            "action": [
                "Measure the gap; missing tufts over 10 mm and any hole through the backing are marked for repair or cut-out.",
                "If tufts are missing in a line, stop the tufter and replace the needle.",
                "Small gaps may be re-tufted by hand with yarn from the same lot.",
            ],
            "prevention": [
                "Run the yarn-break detector and check needles at every start-up.",
                "Keep ignition sources away from the line; clean the oven filters weekly.",
                "Keep tables clear of tools and sharp offcuts.",
            ],
        },
        "stain": {
            "desc": "A diffuse patch of changed colour in the pile: dark oil, brown mud, white line-paint overspray or "
                    "yellowed UV-bleached blades.",
            "cause": [
                "Oil dripping from the tufting machine or the coating line rollers.",
                "Mats stored outdoors or on a wet floor, picking up mud and water marks.",
                "Line-marking paint overspray in the finishing area, or yarn from a lot with the wrong UV stabiliser.",
            ],
            "action": [
                "Blot fresh oil with absorbent cloth; do not rub it into the pile.",
                "Compare the patch with the shade band from 2 m; visible stains are marked and the section held for cleaning.",
                "If a whole yarn lot looks bleached, quarantine the remaining yarn and inform the supplier.",
            ],
            "prevention": [
                "Fit drip trays under the tufting machine and check lubrication points daily.",
                "Store rolls wrapped, indoors and off the floor.",
                "Separate the line-marking area from the finishing area; check the UV certificate of each yarn lot.",
            ],
        },
        "contamination": {
            "desc": "Foreign material in the pile: rubber infill granules, sand, plastic litter or dead leaves, with a "
                    "colour and texture unlike the blades.",
            "cause": [
                "Infill spilled near the line when sample mats are filled for testing.",
                "Dust, sand and litter carried in on pallets or by the wind through open doors.",
                "Foreign fibres from other yarn lots caught on the creel and tufted in.",
            ],
            "action": [
                "Vacuum or brush out loose material before the mat is rolled.",
                "Foreign fibres tufted into the pile are pulled out by hand; larger areas are marked for cut-out.",
                "Record the material so that its source can be removed.",
            ],
            "prevention": [
                "Fill test samples in a separate room and clean up infill spills immediately.",
                "Keep doors near the line closed and sweep the area each shift.",
                "Clean the creel and yarn guides at each lot change.",
            ],
        },
    },
    "closing_heading": "Escalation and records",
    "closing": [
        "Escalate to the quality supervisor when a section is cut out, when a defect repeats at the same position "
        "across the width, or when a yarn lot is quarantined.",
        "Record every mark, repair and cut-out in the roll report with the roll number, metre position, defect type, "
        "the flagged tile image and the page of this manual that was applied.",
        "Rolls with open defects are labelled HOLD and are not wrapped until the supervisor releases them.",
        "Keep roll reports for the warranty period of the product.",
    ],
}

_CONTENT[("brick", "ko")] = {
    "title": "점토 외장 벽돌 패널 품질 매뉴얼",
    "doc": "문서 번호 QM-BRK-KO, 개정 3판. 길이 쌓기와 10 mm 오목 줄눈으로 된 조립식 점토 외장 벽돌 패널에 적용한다.",
    "scope": [
        "이 매뉴얼은 검사원과 교대 조장이 패널이 공장을 떠나기 전에 표면 결함을 식별하고 격리하며 예방하는 방법을 설명한다.",
        "벽돌의 노출면과 모르타르 줄눈을 대상으로 한다. 철골 프레임, 인양 앵커, 치수 검사는 구조 검사 계획서를 따른다.",
        "결함 유형마다 한 페이지에 원인, 즉시 조치, 예방을 정리하였다. 부적합 보고서에는 해당 페이지 번호를 인용한다.",
    ],
    "overview": [
        "최종 검사대에서 1000 lux 이상의 확산 주광 조명 아래 1 m 거리에서 정면으로 본 다음 약 30도의 비스듬한 각도로 다시 본다.",
        "카메라는 패널을 256 x 256 픽셀 타일로 촬영하고 이상 점수가 높은 타일을 표시한다. 표시된 타일은 검사원의 판정 없이 출하하지 않는다.",
    ],
    "criteria": [
        "스크래치: 벽돌 면에서 30 mm 이상이거나 3 m 거리에서 보이는 것은 불합격이다.",
        "균열: 벽돌을 관통하거나 가로 줄눈을 따라가는 균열은 불합격이며, 폭 0.2 mm, 길이 20 mm 미만의 소성 잔균열은 허용한다.",
        "구멍: 깊이 3 mm 또는 폭 6 mm를 넘는 구멍은 불합격이며, 석회 팽창 파열은 항상 불합격이다.",
        "얼룩: 마른 솔질 후 3 m 거리에서 보이는 얼룩은 불합격이며, 솔질로 제거되는 백화는 기록만 한다.",
        "이물질: 모르타르 얼룩, 페인트, 목재나 금속 조각이 표면에 남아 있으면 안 된다.",
    ],
    "defects": {
        "scratch": {
            "desc": "벽돌 표면을 가로지르는 가늘고 곧거나 약간 휜 선으로, 긁힌 곳은 소성 표면보다 밝고 오염이 눌린 곳은 어둡다.",
            "cause": [
                "패널끼리 또는 목재 받침 없이 강재 적재 프레임 위에서 끌려 이동한 경우.",
                "줄눈 작업 중 흙손이나 줄눈 공구, 철솔이 줄눈 밖으로 미끄러진 경우.",
                "진공 인양기의 고무 패드 아래에 모래 알갱이가 끼어 있었던 경우.",
            ],
            "action": [
                "해당 프레임의 적재를 멈추고 같은 프레임의 다음 패널 세 장을 확인한다.",
                "스크래치 길이를 재고, 30 mm를 넘거나 소성 표면이 깨졌으면 타일에 표시하고 패널을 보류한다.",
                "가벼운 긁힘은 같은 로트의 벽돌 분말과 나일론 솔로만 다듬을 수 있다.",
            ],
            "prevention": [
                "모든 적재 프레임에 목재 받침과 모서리 보호대를 사용하고 마모된 받침은 매주 교체한다.",
                "진공 인양기 패드는 교대 시작 시와 열 번 인양할 때마다 청소한다.",
                "외장 줄눈 작업에는 플라스틱 면 줄눈 공구를 사용하도록 작업자를 교육한다.",
            ],
        },
        "crack": {
            "desc": "벽돌이나 모르타르 줄눈을 따라 이어지는 들쭉날쭉한 어두운 선으로, 자주 갈라지며 길이에 따라 폭이 변한다.",
            "cause": [
                "가마 안의 열충격이나 불균일한 냉각으로 개별 벽돌에 소성 균열이 생긴 경우.",
                "모르타르가 취급 강도 7 MPa에 도달하기 전에 패널을 들어 올리거나 기울인 경우.",
                "물이 많은 모르타르의 건조 수축, 또는 섭씨 5도 이하의 옥외 양생 중 동해를 입은 경우.",
            ],
            "action": [
                "패널을 보류하고 품질 관리자가 균열을 평가하기 전에는 다시 들어 올리지 않는다.",
                "균열 폭 카드로 길이와 최대 폭을 기록하고 스케일과 함께 사진을 찍는다.",
                "벽돌을 관통하거나 20 mm를 넘는 균열은 불합격이며 즉시 교대 조장에게 알린다.",
            ],
            "prevention": [
                "입고되는 벽돌 로트마다 가마 냉각 곡선을 확인하고 소성 균열이 2 %를 넘는 로트는 반품한다.",
                "공시체 시험으로 취급 강도가 확인될 때까지 패널을 양생대에 둔다.",
                "배합표에 따라 모르타르 수량을 관리하고 양생 중인 패널을 서리와 외풍으로부터 보호한다.",
            ],
        },
        "hole": {
            "desc": "벽돌 표면에 생긴 어두운 구멍이나 공동으로, 가장자리에 그늘이 지며 바늘구멍부터 수 밀리미터 크기까지 있다.",
            "cause": [
                "점토 속 석회 입자가 소성 후 수화하면서 표면을 원뿔 모양으로 터뜨린 경우.",
                "점토 속 기포나 돌이 표면 질감 가공 때 드러난 경우.",
                "줄눈 교차부에 모르타르가 빠져 빈 공간이 남은 경우.",
            ],
            "action": [
                "깊이 게이지로 구멍을 재고 깊이 3 mm 또는 폭 6 mm를 넘으면 패널을 불합격 처리한다.",
                "구멍 바닥에 흰 심이 보이면 석회 팽창 파열로 보고 해당 벽돌 로트 전체를 보류한다.",
                "줄눈의 빈 곳은 당일에 같은 배합의 모르타르로 다시 채울 수 있다.",
            ],
            "prevention": [
                "벽돌 공급사에 로트마다 석회 팽창 시험 결과를 요구한다.",
                "하역 시 벽돌을 검사하여 구멍이나 흰 반점이 있는 벽돌을 골라낸다.",
                "줄눈을 완전히 채우고 엄지 자국이 남을 정도로 굳었을 때 마감한다.",
            ],
        },
        "stain": {
            "desc": "경계가 흐릿한 변색 부위로, 흰 백화, 갈색 녹물, 어두운 습기 자국, 녹색 조류 등이 있다.",
            "cause": [
                "굳지 않은 모르타르에서 증발하는 물이 가용성 염분을 표면으로 옮긴 경우.",
                "보호되지 않은 강재 인방, 긴결재, 적재 프레임의 녹이 표면으로 흘러내린 경우.",
                "덮개 없이 보관하여 빗물이나 세척수가 고르지 않게 마르거나 거푸집 박리유가 튄 경우.",
            ],
            "action": [
                "패널을 말린 후 얼룩을 마른 솔로 닦고, 솔질로 지워지는 백화는 기록만 한다.",
                "남아 있는 녹이나 기름 얼룩은 표시하고 마감 팀의 청소를 위해 패널을 보류한다.",
                "라인에서 산으로 표면을 씻지 않는다. 산 세척은 작업 절차서에 따라 마감 팀만 한다.",
            ],
            "prevention": [
                "보관 중인 패널은 윗면과 옆면을 덮어 물이 표면을 따라 흐르지 않게 한다.",
                "아연 도금 또는 스테인리스 긴결재와 인방을 사용하고 보관 중 강재가 벽돌 면에 닿지 않게 한다.",
                "저알칼리 시멘트와 깨끗한 배합수를 사용하고 박리유가 외장 면에 닿지 않게 한다.",
            ],
        },
        "contamination": {
            "desc": "모르타르 튄 자국, 페인트 조각, 그을음, 목재 부스러기나 섬유처럼 점토와 색과 질감이 다른 이물질이다.",
            "cause": [
                "줄눈 작업 중 모르타르가 떨어지거나 튀어 굳은 경우.",
                "표시용 페인트 분무, 지게차 배기 그을음, 부러진 받침의 목재 부스러기.",
                "양생 덮개의 먼지와 섬유가 아직 젖은 표면에 붙은 경우.",
            ],
            "action": [
                "부드러운 솔과 2 bar 이하의 압축 공기로 느슨한 이물질을 제거한다.",
                "굳은 모르타르는 표시하고 마감 팀이 강철 공구가 아닌 플라스틱 스크레이퍼로 제거한다.",
                "원인이 알려진 경우 종류를 기록하여 라인에서 발생원을 없앤다.",
            ],
            "prevention": [
                "인접 줄눈 작업 시 완성된 면을 판으로 보호하고 튄 모르타르는 30분 안에 닦는다.",
                "외장 작업 구역에 표시용 페인트와 디젤 지게차의 출입을 금지한다.",
                "해진 양생 덮개는 교체하고 바닥에서 띄워 보관한다.",
            ],
        },
    },
    "closing_heading": "보고 및 기록",
    "closing": [
        "균열이나 석회 팽창 파열로 불합격된 경우, 한 교대에서 같은 결함이 세 장 이상 나온 경우, 원인이 불분명한 경우에는 즉시 품질 엔지니어에게 보고한다.",
        "보류 또는 불합격된 패널은 패널 번호, 결함 유형, 타일 이미지, 이상 점수, 적용한 매뉴얼 페이지를 부적합 기록부에 기록한다.",
        "보류 패널에는 빨간 꼬리표를 달아 격리 구역으로 옮기며 품질 엔지니어만 해제할 수 있다.",
        "검사 기록은 패널 생산 기록과 함께 10년간 보관한다.",
    ],
}

_LABELS = {
    "en": {"scope": "Scope", "overview": "Inspection overview", "criteria": "Acceptance criteria",
           "page": "page", "of": "of", "product": "Product"},
    "ko": {"scope": "적용 범위", "overview": "검사 개요", "criteria": "합격 기준",
           "page": "page", "of": "of", "product": "제품"},
}


def manual_langs(product: str) -> tuple[str, ...]:
    """Languages in which a manual exists for ``product`` (("en", "ko") for brick)."""
    return MANUAL_LANGS[product]


def defect_heading(defect: str, lang: str) -> str:
    """Section heading of a defect page, e.g. ``"4. Crack (균열)"`` / ``"4. 균열 (Crack)"``."""
    n = FIRST_DEFECT_SECTION + DEFECT_TYPES.index(defect)
    en, ko = DEFECT_NAMES[defect]
    return f"{n}. {en} ({ko})" if lang == "en" else f"{n}. {ko} ({en})"


def manual_content(product: str, lang: str = "en") -> dict:
    """The structured text of a manual (title, scope, defects -> cause/action/prevention lists ...).

    Raises:
        KeyError: no manual for this product / language.
    """
    return _CONTENT[(product, lang)]


def manual_pages(product: str, lang: str = "en") -> list[list[tuple[str, str]]]:
    """The manual as pages of ``(style, text)`` blocks, style in title/h1/h2/p/bullet/small.

    This is exactly the text written into the PDF (before the footer).
    """
    c = manual_content(product, lang)
    lab = _LABELS[lang]
    info = _product_names(product)
    pages: list[list[tuple[str, str]]] = []
    p1 = [("title", c["title"]), ("small", f"{lab['product']}: {info}"), ("small", c["doc"]),
          ("h1", f"1. {lab['scope']}")]
    p1 += [("p", t) for t in c["scope"]]
    pages.append(p1)
    p2 = [("h1", f"2. {lab['overview']}")] + [("p", t) for t in c["overview"]] + [("h2", lab["criteria"])]
    p2 += [("bullet", t) for t in c["criteria"]]
    pages.append(p2)
    sub = SUBHEADINGS[lang]
    for d in DEFECT_TYPES:
        body = c["defects"][d]
        page = [("h1", defect_heading(d, lang)), ("p", body["desc"])]
        for heading, key in zip(sub, ("cause", "action", "prevention")):
            page.append(("h2", heading))
            page += [("bullet", t) for t in body[key]]
        pages.append(page)
    n_close = FIRST_DEFECT_SECTION + len(DEFECT_TYPES)
    pages.append([("h1", f"{n_close}. {c['closing_heading']}")] + [("p", t) for t in c["closing"]])
    return pages


def _product_names(product: str) -> str:
    p = product_info(product)
    return f"{p['en']} ({p['ko']}) — id {product}"


# --------------------------------------------------------------------------- layout

_STYLES = {  # font size, space before, bold
    "title": (20.0, 0.0, True),
    "h1": (15.0, 14.0, True),
    "h2": (12.0, 10.0, True),
    "p": (10.5, 6.0, False),
    "bullet": (10.5, 3.0, False),
    "small": (9.0, 4.0, False),
}


class _Fonts:
    def __init__(self) -> None:
        import pymupdf  # only when manuals are written: importing PyMuPDF takes ~1 s of every CLI start

        self.regular = pymupdf.Font("helv")
        self.bold = pymupdf.Font("hebo")
        self.cjk = pymupdf.Font("korea")

    def pick(self, text: str, bold: bool) -> pymupdf.Font:
        if _HANGUL.search(text):
            return self.cjk
        return self.bold if bold else self.regular


def _wrap(text: str, font: pymupdf.Font, size: float, width: float) -> list[str]:
    lines: list[str] = []
    cur = ""
    for word in text.split():
        cand = f"{cur} {word}" if cur else word
        if cur and font.text_length(cand, fontsize=size) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    if cur:
        lines.append(cur)
    return lines


def write_manual(path: Path, product: str, lang: str = "en") -> dict:
    """Write one manual PDF and return its manifest entry.

    Args:
        path: output file (parent folders are created).
        product: product id (brick, gravel, grass).
        lang: "en", or "ko" (brick only).

    Returns:
        ``{"product", "lang", "path" (as given), "pages", "title"}``.

    Raises:
        KeyError: no manual content for this product / language.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = manual_content(product, lang)
    import pymupdf

    fonts = _Fonts()
    doc = pymupdf.open()
    width = _PAGE_W - 2 * _MARGIN
    bottom = _PAGE_H - _MARGIN - 20
    for blocks in manual_pages(product, lang):
        page = doc.new_page(width=_PAGE_W, height=_PAGE_H)
        tw = pymupdf.TextWriter(page.rect)
        y = _MARGIN
        for style, text in blocks:
            size, before, bold = _STYLES[style]
            font = fonts.pick(text, bold)
            indent = 14.0 if style == "bullet" else 0.0
            y += before
            lines = _wrap(text, font, size, width - indent)
            if y + size * 1.35 * len(lines) > bottom:  # overflow: continue on a new page
                tw.write_text(page)
                page = doc.new_page(width=_PAGE_W, height=_PAGE_H)
                tw = pymupdf.TextWriter(page.rect)
                y = _MARGIN
            if style == "bullet":
                tw.append((_MARGIN + 3, y + size), "•", font=fonts.regular, fontsize=size)
            for line in lines:
                y += size * 1.35
                tw.append((_MARGIN + indent, y), line, font=font, fontsize=size)
            if style == "title":
                y += 8
        tw.write_text(page)
    total = doc.page_count
    title = content["title"]
    for i, page in enumerate(doc, start=1):
        footer = f"{title} — page {i} of {total}"
        font = fonts.pick(footer, False)
        tw = pymupdf.TextWriter(page.rect, color=(0.35, 0.35, 0.35))
        x = (_PAGE_W - font.text_length(footer, fontsize=8.5)) / 2
        tw.append((x, _PAGE_H - _MARGIN / 2), footer, font=font, fontsize=8.5)
        tw.write_text(page)
        page.draw_line((_MARGIN, _PAGE_H - _MARGIN / 2 - 14), (_PAGE_W - _MARGIN, _PAGE_H - _MARGIN / 2 - 14),
                       color=(0.7, 0.7, 0.7), width=0.5)
    doc.set_metadata({
        "title": title,
        "author": "Quality Engineering (defect response agent sample data)",
        "subject": product,
        "keywords": f"product={product};lang={lang}",
        "creator": "data/manuals.py (PyMuPDF)",
        "producer": f"PyMuPDF {pymupdf.VersionBind}",
    })
    doc.subset_fonts()
    doc.save(path, garbage=3, deflate=True)
    doc.close()
    return {"product": product, "lang": lang, "path": str(path), "pages": total, "title": title}


def write_manuals(out_dir: Path) -> list[dict]:
    """Write every sample manual under ``out_dir/manuals/``; entries carry paths relative to ``out_dir``.

    Files: ``manuals/{product}_manual_{lang}.pdf`` for each product and language
    in :data:`MANUAL_LANGS` (3 English + 1 Korean).
    """
    out_dir = Path(out_dir)
    entries = []
    for product in PRODUCTS:
        for lang in manual_langs(product):
            rel = f"manuals/{product}_manual_{lang}.pdf"
            entry = write_manual(out_dir / rel, product, lang)
            entry["path"] = rel
            entries.append(entry)
    return entries

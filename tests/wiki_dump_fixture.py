"""A tiny MediaWiki XML dump for tests: real markup (templates, refs, links, tables, files, categories),
a redirect, a disambiguation page and a talk page that the reader must skip, and six real articles."""

from __future__ import annotations

import bz2
from pathlib import Path
from xml.sax.saxutils import escape

ARTICLES: dict[str, str] = {
    "Zorblat": """{{Infobox person|name=Zorblat|birth_date=1901}}
'''Zorblat''' is a fictional [[baker]] from [[Quenta|the town of Quenta]].<ref>{{cite web|url=http://x.org|title=X}}</ref> He is known for bread that keeps for a year. Zorblat was born in Quenta in 1901. Zorblat founded the Quenta Baking Guild in 1930, which still exists.

== Early life ==
In 1915, Zorblat left school to work in the mill of his uncle Harlan Vesk. The mill stood on the [[Odrin River]] and ground rye for the whole valley. He learned there how grain becomes flour and how flour becomes dough.
[[File:Zorblat.jpg|thumb|Zorblat in [[1930]]]]

== Career ==
{| class="wikitable"
|-
! Year !! Bakery
|-
| 1930 || Guild
|}
The Quenta Baking Guild was founded by Zorblat with eleven other bakers. The guild set the price of bread in Quenta for forty years, and it trained more than three hundred apprentices.

== References ==
{{reflist}}
* [http://example.org Example]
[[Category:Bakers]]""",
    "Mirelle": """'''Mirelle''' (born 1990) is a [[harp]]ist from [[Odrin]]. She plays the concert harp with the Odrin Symphony. Mirelle was born in Odrin in 1990 to a family of fishermen.

== Music ==
In 2012, Mirelle won the Valley Harp Prize with a piece by the composer Tessaly Orn. Her recordings include three albums of folk songs from the river valley, and one album of sacred music sung in the old cathedral of Odrin.

== See also ==
* [[Harp]]""",
    "Quenta": """'''Quenta''' is a small town on the Odrin River. The town has about four thousand inhabitants and a market every Tuesday. The capital of Quenta Province is Quenta.

== History ==
In 1650, Quenta received a charter from the duke of the valley. The old bridge over the river was built in 1702 and survived the great flood of 1888, when most of the lower town was destroyed.

== Economy ==
The economy of Quenta depends on milling, baking and trade along the river. The Quenta Baking Guild is the largest employer, followed by the river port and the rye mills to the north of the town.""",
    "Odrin": """'''Odrin''' is a port city at the mouth of the Odrin River. It is the seat of the Odrin Symphony and of an old cathedral. Fishermen have worked from its harbour for at least a thousand years.

== Geography ==
Odrin lies on a bay sheltered by two long sand spits. The climate is mild and wet, with fog in spring and storms in late autumn that close the harbour for several days every year.""",
    "Tessaly Orn": """'''Tessaly Orn''' was a composer of harp music. She was born in Quenta in 1921 and died in Odrin in 1999. Tessaly Orn wrote more than forty pieces for harp and voice.

== Works ==
Her best known work is the Valley Suite, a cycle of seven songs about the river. It was first performed in Odrin in 1964 by the cathedral choir and a single harp, and it is still sung at the spring festival.""",
    "Harlan Vesk": """'''Harlan Vesk''' was a miller on the Odrin River. He was born in 1870 and ran the largest rye mill in the valley for forty years. Harlan Vesk built a second mill at Quenta in 1905.

== Later life ==
In 1920, Harlan Vesk sold his mills to the Quenta Baking Guild and moved to Odrin, where he wrote a short history of milling in the valley that is still read by local historians.""",
}
SKIPPED: dict[str, tuple[str, str]] = {  # title -> (namespace, wikitext)
    "Zorblatt": ("0", "#REDIRECT [[Zorblat]]"),
    "Quenta (disambiguation)": ("0", "'''Quenta''' may refer to:\n* [[Quenta]], a town\n* Quenta, a cake"),
    "Talk:Zorblat": ("1", "This talk page says many things about Zorblat that are not an article at all."),
}


def _page(i: int, title: str, ns: str, text: str) -> str:
    redirect = '<redirect title="x" />' if text.startswith("#REDIRECT") else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{i}</id>{redirect}<revision><id>{1000 + i}</id>"
            f"<text xml:space=\"preserve\">{escape(text)}</text></revision></page>\n")


def write_dump(path: Path) -> Path:
    """The dump as ``.xml.bz2`` at ``path``."""
    pages = [_page(i, t, "0", x) for i, (t, x) in enumerate(ARTICLES.items(), 10)]
    pages += [_page(i, t, ns, x) for i, (t, (ns, x)) in enumerate(SKIPPED.items(), 100)]
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
           + "".join(pages) + "</mediawiki>\n")
    path.write_bytes(bz2.compress(xml.encode()))
    return path

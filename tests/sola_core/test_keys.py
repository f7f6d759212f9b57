"""Key sources: the paper's in-layer key and the frozen sentence-encoder key (all-MiniLM-L6-v2, shipped on PyPI)."""
import pytest
import torch

from registry.errors import ValidationError
from sola_core import EditConfig, RuntimeConfig, SolaEditor, TrainConfig
from sola_core.config import NAMED_RADIUS, RELATION_RADIUS
from sola_core.routing import EditMentions
from sola_core.keys import (EncoderKey, LayerKey, Mentions, as_it, asked_parts, asked_kinds, asks, key_source,
                            name_runs, names, refilled, same_word, stem, undescribed, unlabelled, words)

TRAIN = TrainConfig(lr=5e-2, max_steps=200, margin=1.0)


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return EncoderKey(tokenizer)


def test_unknown_key_source_is_refused():
    with pytest.raises(ValidationError, match="^unknown key source 'nope'; known: encoder, layer$"):
        key_source("nope")


def test_layer_key_takes_each_rows_last_prompt_token():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    q = LayerKey().query(x, torch.tensor([2, 0]), None)
    assert torch.equal(q, torch.stack([x[0, 2], x[1, 0]]))


def test_encoder_embeds_the_unpadded_prompt_text(encoder, tokenizer):
    prompts = ["The capital of France is", "Hi"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    queries, mentions = encoder.from_tokens(enc["input_ids"], enc["attention_mask"])
    assert queries.shape == (2, 1, 384) and encoder.dim(64) == 384
    assert mentions == [Mentions(frozenset({"france"}), frozenset({"capital", "france"}), "The capital of France is",
                                 ({"france"},)),
                        Mentions(frozenset(), frozenset(), "Hi", ())]
    assert torch.allclose(queries[:, 0], encoder.embed(prompts), atol=1e-5)
    assert torch.allclose(queries[:, 0].norm(dim=1), torch.ones(2))


def test_a_prompt_of_several_lines_is_queried_whole_and_line_by_line(encoder):
    texts = ["Please answer the question:\n\nQ: What is the capital of France?\nA:", "One line"]
    queries = encoder.queries(texts)
    assert queries.shape == (2, 3, 384)  # the lines without their labels ("Q: ", "A:"), which the key never had
    want = encoder.embed([texts[0], "Please answer the question:", "What is the capital of France?",
                          "One line"])  # one batch, as queries() embeds them (bf16 batches differ by ~1e-3)
    assert torch.allclose(queries[0], want[:3], atol=1e-5)
    assert torch.allclose(queries[1, 0], want[3], atol=1e-5)
    assert torch.isnan(queries[1, 1:]).all()  # padding: finds nothing


def test_bfloat16_encoder_keys_stay_far_inside_any_threshold(tokenizer):
    """Keys made in one dtype serve queries made in the other: they differ by ~1e-5, the supersede distance is 0.01."""
    prompts = ["The capital of France is", "Tokyo is a city in the country of", "The currency of Peru is the"]
    fp32, bf16 = (EncoderKey(tokenizer, dtype) for dtype in ("float32", "bfloat16"))
    a, b = fp32.embed(prompts), bf16.embed(prompts)
    assert not fp32.bf16 and bf16.bf16 and a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)  # it really ran in bfloat16
    assert (1 - (a * b).sum(1)).max() < 1e-3


def test_unknown_encoder_dtype_is_refused(tokenizer):
    with pytest.raises(ValidationError, match="encoder dtype must be one of auto, float32, bfloat16, got 'fp8'"):
        EncoderKey(tokenizer, "fp8")
    with pytest.raises(ValidationError, match="encoder_dtype must be one of auto, float32, bfloat16"):
        RuntimeConfig(encoder_dtype="half")


def test_encoder_places_paraphrases_nearer_than_neighbours(encoder):
    k = encoder.embed(["The capital of France is", "The capital city of France is", "The capital of Germany is"])
    d = 1 - k @ k[0]
    assert d[1] < 0.1 < 0.3 < d[2]


def test_paraphrase_routes_to_the_edit_with_the_encoder_key(tmp_path, llama, tokenizer):
    config = EditConfig(key_source="encoder", threshold=0.15)
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=config) as editor:
        assert editor.registry.config.key_dim == 384 and editor.registry.config.key_source == "encoder"
        eid = editor.edit("The capital of France is", " Lyon", TRAIN)
        routes = editor.route(["The capital city of France is", "The capital of Germany is", "Hello"])
        assert routes == [eid, None, None]
        editor.rollback(eid)
        assert editor.route(["The capital of France is"]) == [None]


def test_a_question_after_an_instruction_routes_through_its_own_line(tmp_path, llama, tokenizer):
    """The whole instructed prompt lies beyond the threshold of the question's key; its question line does not."""
    question = "What is the capital of France?"
    asked = f"Please answer the question:\n\nQ: {question}\nA:"
    other = "Please answer the question:\n\nQ: How tall is Mount Everest?\nA:"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(question, " Lyon", TRAIN)
        whole = 1 - editor.router.keys.embed([asked])[0] @ editor.key(question)
        assert whole > editor.registry.config.threshold  # one query for the whole text would miss it
        assert editor.route([asked, other, question]) == [eid, None, eid]
        editor.generate([asked, other], max_new_tokens=2)
        assert editor.routed() == [eid, None]
        editor.rollback(eid)
        assert editor.route([asked, question]) == [None, None]


def test_names_are_the_proper_nouns_and_numbers_a_text_names():
    assert names("The national capital of the island nation of Japan is") == {"japan"}
    assert names("Quick question: what's the capital of Japan's neighbour?") == {"japan"}
    assert names("Please answer the question:\n\nQ: In which year did World War 2 end?\nA:") == {"world", "war", "2"}
    assert names("the largest ocean is") == frozenset()  # nothing named: routes by the threshold alone
    assert names("Stonehenge can be found in") == frozenset()  # a query's first word never counts
    assert names("Stonehenge can be found in", openings=True) == {"stonehenge"}  # an edit's does, unless an opener
    assert names("What is the capital of Japan?", openings=True) == {"japan"}
    assert unlabelled(" Q: What is it?") == "What is it?" and unlabelled("A:") == ""
    assert unlabelled("Please answer the question:") == "Please answer the question:"  # a sentence, not a label


def test_name_runs_group_a_texts_names_as_they_stand():
    assert name_runs("The capital of Papua New Guinea is") == ({"papua", "new", "guinea"},)
    assert name_runs("The Night Watch was painted by", openings=True) == ({"night", "watch"},)  # "The" an opener
    assert name_runs("The Adventures of Tom Sawyer") == ({"adventures"}, {"tom", "sawyer"})
    assert name_runs("Niger is in", openings=True) == ({"niger"},)  # an edit's first word names its subject
    assert name_runs("Niger is in", openings=True, alone=False) == ()  # a query's, only inside a longer name:
    assert name_runs("Science quiz: who discovered it?", openings=True, alone=False) == ()
    assert name_runs("Democratic Republic of the Congo is", openings=True, alone=False) == (
        {"democratic", "republic"}, {"congo"})
    assert name_runs("1977 was the year of", openings=True, alone=False) == ({"1977"},)  # a number always counts
    assert Mentions.of("U.S. Virgin Islands is").runs == ({"u", "s", "virgin", "islands"},)


def test_same_word_forgives_one_letter_in_a_long_word():
    assert same_word("crocket", "crockett") and same_word("everly", "everley") and same_word("grocer", "grocer")
    assert not same_word("niger", "nigeria") and not same_word("iran", "iraq") and not same_word("north", "south")
    assert not same_word("austria", "australia") and not same_word("abcde", "abcd")


def test_a_query_naming_another_subject_stays_with_the_base_model_even_near_the_key(tmp_path, llama, tokenizer):
    """"South Korea" lies within the threshold of an edit of "North Korea", and "Equatorial Guinea" within
    NAMED_RADIUS of one of "Papua New Guinea": close embeddings, other names. A shorter or longer form of the
    edit's name, or a one-letter misspelling, may be the same subject and still routes."""
    korea, guinea = "The currency of North Korea is the", "The capital of Papua New Guinea is"
    others = ["The currency of South Korea is the", "The capital of Equatorial Guinea is"]
    same = ["The official currency of North Korea is the", "Which city is the capital of New Guinea?",
            "The currency of Nortth Korea is the"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = editor.edit_many([{"prompt": korea, "target": " euro"}, {"prompt": guinea, "target": " Lima"}], TRAIN)
        dist = 1 - editor.router.keys.embed(others) @ torch.stack([editor.key(korea), editor.key(guinea)]).T
        assert dist[0, 0] <= editor.registry.config.threshold < dist[1, 1] <= NAMED_RADIUS
        assert editor.route(others) == [None, None]
        assert editor.route(same) == [ids[0], ids[1], ids[0]]


def test_an_edit_opening_with_its_subject_routes_queries_that_name_it(tmp_path, llama, tokenizer):
    """The edit's opening word is its subject: a question naming Stonehenge within NAMED_RADIUS routes to it; a
    query opening with the other edit's template word ("Record") names nothing, and stays with the base model."""
    asked, templated = "Tell me: the stone circle of Stonehenge is found in the country of", \
        "Record stores file Radiohead under the genre"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = editor.edit_many([{"prompt": "Stonehenge can be found in", "target": " Peru"},
                                {"prompt": "Record stores file Kraftwerk under the genre", "target": " jazz"}], TRAIN)
        dist = 1 - (editor.router.keys.embed([asked, templated]) * torch.stack([editor.key(editor.registry.get(i).prompt)
                                                                               for i in ids])).sum(1)
        assert (editor.registry.config.threshold < dist).all() and (dist < NAMED_RADIUS).all()
        assert editor.route([asked, templated]) == [ids[0], None]


def test_an_edit_given_its_subject_routes_queries_that_say_all_of_it(tmp_path, llama, tokenizer):
    """A subject named by common nouns has no proper noun to route by: given with the edit, a query within
    NAMED_RADIUS that says every word of it routes; a neighbour of the same relation as near does not. Without
    it, the words the query shares with the edit stand for its subject
    (`test_an_edit_naming_nothing_routes_by_the_words_the_edits_near_the_query_do_not_share`) and route the same."""
    prompt, reworded = "The telephone was invented by", "The first practical telephone was devised by"
    neighbour = "The mobile phone was invented by"
    assert words("the telephone") == {"telephone"} and words("The Mona Lisa") == {"mona", "lisa"}
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        plain = editor.edit(prompt, " Edison", TRAIN)
        dist = 1 - editor.router.keys.embed([reworded, neighbour]) @ editor.key(prompt)
        assert (editor.registry.config.threshold < dist).all() and (dist < NAMED_RADIUS).all()
        assert editor.route([reworded, neighbour]) == [plain, None]
        eid = editor.edit(prompt, " Edison", TRAIN, subject="the telephone")  # supersedes the edit without one
        assert editor.registry.get(eid).subject == "the telephone" and editor.registry.get(plain).subject is None
        assert editor.route([reworded, neighbour, prompt]) == [eid, None, eid]
        editor.generate([reworded, neighbour], max_new_tokens=2)
        assert editor.routed() == [eid, None]
        with pytest.raises(ValidationError, match="^subject 'the phone' is not in the prompt 'The telephone was "
                                                  "invented by': give the words it is named by there$"):
            editor.edit(prompt, " Edison", TRAIN, subject="the phone")


def test_what_a_text_asks_is_its_words_but_its_subject_and_openers():
    assert asks("Which filmmaker directed Citizen Kane?", frozenset({"citizen", "kane"})) == {"filmmak", "direct"}
    assert asks("The director of Citizen Kane is", frozenset({"citizen", "kane"})) == {"direct"}
    assert asks("Japan's capital is", frozenset({"japan"})) == {"capital"}  # no "s"
    assert as_it("The capital of Saint Kitts and Nevis is", frozenset({"saint", "kitts", "nevis"})) == \
        "The capital of it is"


def test_a_particle_inside_a_name_is_what_a_text_is_about_not_what_it_asks():
    """Two questions about Jacqueline du Pré share "du": read as asked, it made any other role of hers pass the
    relation check by a word in common. "van" outside a name is still asked."""
    about = frozenset({"jacqueline", "pré"})
    other_role, prompt = "Who taught Jacqueline du Pré the cello?", "Jacqueline du Pré played the"
    assert asks(other_role, about) == {"taught", "cello"} and asks(prompt, about) == {"play"}
    assert not EditMentions(None).asks_the_same([prompt], other_role, about)  # words alone, no encoder
    assert "van" in asks("Which company makes the Transit van?", frozenset())
    assert asks("Who painted Jan van der Pelt?", frozenset()) == {"paint", "jan", "pelt"}
    assert as_it("Ludwig van Beethoven composed", frozenset({"ludwig", "beethoven"})) == "it composed"
    caliph = frozenset({"abd", "malik", "marwan"})  # a hyphen joins a particle too
    assert asks("Which faith did Abd al-Malik ibn Marwan follow?", caliph) == {"faith", "follow"}
    assert as_it("Abd al-Malik ibn Marwan follows the religion of", caliph) == "it follows the religion of"
    assert as_it("Who founded Coca-Cola?", frozenset({"coca", "cola"})) == "Who founded it?"  # one name, one "it"


def test_a_query_naming_the_edits_subject_routes_only_when_it_asks_the_same(tmp_path, llama, tokenizer):
    """Within NAMED_RADIUS, all three queries name Estonia as the edit does; only the one asking for its currency
    routes. Another relation of the same subject keeps the base model's answer."""
    prompt, reworded = "The currency of Estonia is the", "Shops in Estonia take payment in the currency called the"
    others = ["The capital of Estonia is", "The official language of Estonia is"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(prompt, " dollar", TRAIN)
        dist = 1 - editor.router.keys.embed([reworded, *others]) @ editor.key(prompt)
        assert (editor.registry.config.threshold < dist).all() and (dist < NAMED_RADIUS).all()
        assert editor.route([reworded, *others]) == [eid, None, None]


def test_a_query_asking_the_same_in_other_words_routes_by_a_pair_of_near_words(tmp_path, llama, tokenizer):
    """"writer" and "written" share no stem, and the two questions read as "it" embed beyond RELATION_RADIUS; the
    two words embed within it. A question about the book's pages names it as near, and asks something else."""
    prompt, about = "War and Peace was written by", frozenset({"war", "peace"})
    reworded, other = "Who is the writer of the Russian epic War and Peace?", "How many pages does War and Peace have?"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(prompt, " Pushkin", TRAIN)
        embed = editor.router.keys.embed
        dist = 1 - embed([reworded, other]) @ editor.key(prompt)
        assert (editor.registry.config.threshold < dist).all() and (dist < NAMED_RADIUS).all()
        assert not asks(reworded, about) & asks(prompt, about)
        assert 1 - embed([as_it(reworded, about)]) @ embed([as_it(prompt, about)])[0] > RELATION_RADIUS
        assert editor.route([reworded, other]) == [eid, None]


def test_asked_kinds_reads_what_kind_of_answer_the_wording_asks_for():
    for asking in ["When was the telephone invented?", "In what year did the Berlin Wall fall?",
                   "Quick one: how many moons does Mars have?", "The telephone was invented in the year",
                   "Please answer the question:\n\nQ: When did it open?\nA:"]:
        assert asked_kinds(asking) == {"number"}, asking
    for asking in ["Who composed The Magic Flute?", "Who received the Ig Nobel Prize in Mathematics in the year 1993?",
                   "Which scientist discovered oxygen?", "Penicillin was discovered by", "The inventor of the revolver is",
                   "The Sydney Opera House was designed by the architect", "Which band did Eric Clapton play in?"]:
        assert asked_kinds(asking) == {"agent"}, asking
    for asking in ["Which album features Thriller?", "What instrument is associated with Niccolò Paganini?",
                   "In which field did Noam Chomsky work?"]:
        assert asked_kinds(asking) == {"thing"}, asking
    for asking in ["Where is Heineken headquartered?", "In which country was penicillin discovered?",
                   "The Taj Mahal is located in the country of"]:
        assert asked_kinds(asking) == {"place"}, asking
    for asking in ["Please complete the sentence:\n\nToyota is based in", "Serena Williams built a career in"]:
        assert asked_kinds(asking) == {"place", "thing"}, asking
    for unsaid in ["The capital of Japan is", "When Sedat Alp was killed, the locals held a",
                   "What is Pearl Jam's best-selling album?", "Which nation assumed control of the Dutch colony?",
                   "Laurent Cars's work office is surrounded by",
                   "What should one anticipate when requesting Focaccia at an Italian restaurant?", ""]:
        assert asked_kinds(unsaid) == frozenset(), unsaid


def test_a_query_asking_for_a_year_never_routes_to_an_edit_answering_with_a_name(tmp_path, llama, tokenizer):
    """The year of the premiere embeds within the threshold of the composer's edit (same subject, most words in
    common) and routed there; an edit whose answer is a year still takes it."""
    composer, year = "The Magic Flute was composed by", "The Magic Flute was first performed in the year"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(composer, " Salieri", TRAIN)
        assert 1 - editor.key(year) @ editor.key(composer) <= editor.registry.config.threshold
        assert editor.route([year, "When was The Magic Flute first performed?", "Who composed The Magic Flute?"]) \
            == [None, None, eid]
        dated = editor.edit("The Magic Flute premiered in", " 1801", TRAIN)
        assert editor.route(["When did The Magic Flute premiere?"]) == [dated]


def test_a_query_asking_where_never_routes_to_an_edit_asking_who_nor_the_other_way(tmp_path, llama, tokenizer):
    """Where penicillin was discovered lies within the threshold of the edit of who discovered it, and routed
    there; who founded Heineken, within NAMED_RADIUS of the edit of where it is based, passed its relation check.
    A query whose wording leaves the kind unsaid still routes."""
    who, where = "Penicillin was discovered by", "Where is Heineken headquartered?"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = [editor.edit(who, " Pasteur", TRAIN), editor.edit(where, " Oslo", TRAIN)]
        queries = ["In which country was penicillin discovered?", "Who founded Heineken?"]
        dist = [float(1 - editor.key(q) @ editor.key(p)) for q, p in zip(queries, (who, where))]
        assert dist[0] <= editor.registry.config.threshold < dist[1] < NAMED_RADIUS
        assert editor.route(queries) == [None, None]
        assert editor.route(["Who discovered penicillin?", "Heineken has its main offices in",
                             "The discovery of penicillin was made by"]) == [ids[0], ids[1], ids[0]]


def test_who_never_routes_to_an_edit_answering_with_a_common_noun_nor_which_album_to_one_asking_who(
        tmp_path, llama, tokenizer):
    """Who taught Jimi Hendrix passed the relation check of the edit of his instrument, whose answer (no capital
    letter) names nobody; which album features Hotel California, that of who recorded it; where Jimi Hendrix
    played, that of his instrument. A sentence left open at "in" may ask for a thing ("built a career in"): it still
    routes to an edit answering with one, and an edit left open at "in" answers with what its answer says (a sport,
    all lower case, not where Pelé built his career)."""
    edits = [("The instrument played by Jimi Hendrix is the", " piano"),
             ("The song Hotel California was recorded by", " Madonna"),
             ("The sport in which Serena Williams became famous is", " golf"),
             ("The Brazilian footballer Pelé built a legendary career in", " cricket")]
    others = ["Who taught Jimi Hendrix music?", "Which album features Hotel California?", "Where did Jimi Hendrix play?",
              "Where did Pelé build his career?"]
    asked_of = [0, 1, 0, 3]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = [editor.edit(prompt, target, TRAIN) for prompt, target in edits]
        assert all(1 - editor.key(q) @ editor.key(edits[i][0]) < NAMED_RADIUS for q, i in zip(others, asked_of))
        assert editor.route(others) == [None] * len(others)
        assert editor.route(["Which instrument did Jimi Hendrix play?", "Who recorded Hotel California?",
                             "The American athlete Serena Williams built a legendary career in",
                             "In which sport did Pelé build his career?"]) == ids


def test_runs_of_it_read_as_one_and_stems_keep_three_letters():
    assert as_it("The capital of the Democratic Republic of the Congo is",
                 frozenset({"democratic", "republic", "congo"})) == "The capital of it is"
    assert as_it("Who sings Shake It Off?", frozenset({"shake", "off"})) == "Who sings it?"
    assert stem("directed") == stem("director") == "direct" and stem("sings") == "sings"


def test_a_query_is_also_asked_without_the_descriptions_it_introduces_names_with():
    assert undescribed("Which city does the Swiss watchmaker Rolex call home?") == "Which city does Rolex call home?"
    assert undescribed("The Holocaust drama Schindler's List was made by") == "Schindler's List was made by"
    for kept in ["The capital of the United States is", "In the animal kingdom, the Nile crocodile is",
                 "The official language of Japan is", "The chemical symbol of the heavy metal lead is"]:
        assert undescribed(kept) == kept
    assert asked_parts("Who made the whaling novel Moby-Dick?") == ["Who made the whaling novel Moby-Dick?",
                                                                   "Who made Moby-Dick?"]


def test_a_line_is_also_asked_without_its_lead_in():
    assert asked_parts("Coding trivia: who made Java?") == ["Coding trivia: who made Java?", "who made Java?"]
    assert asked_parts("I always forget - which city is the capital of Russia?")[1:] == [
        "which city is the capital of Russia?"]
    assert asked_parts("I keep hearing about Carl Friedrich Gauss - what did he study?") == [
        "I keep hearing about Carl Friedrich Gauss - what did he study?"]  # five words and more: no lead-in
    assert asked_parts("Jean-Paul Sartre was born in") == ["Jean-Paul Sartre was born in"]


def test_a_description_far_from_the_key_is_queried_without_it(tmp_path, llama, tokenizer):
    """Described, the rewording lies beyond NAMED_RADIUS of the edit's key; asked plainly, inside it."""
    prompt, reworded = "Which writer created Moby-Dick?", "The whaling novel Moby-Dick came from the pen of"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(prompt, " Dickens", TRAIN)
        dist = 1 - editor.router.keys.embed([reworded, undescribed(reworded)]) @ editor.key(prompt)
        assert dist[0] > NAMED_RADIUS and dist[1] < NAMED_RADIUS
        assert editor.route([reworded]) == [eid]


def test_a_query_describing_the_subject_routes_by_what_is_left(tmp_path, llama, tokenizer):
    """Read as "it", the brewer's description ("the Dutch brewer Heineken") would be part of the question; left
    out, "The main offices of it are located in" asks where it is headquartered. A description that says what kind
    of thing a film is does not make its release year a question about its director."""
    edits = [("Where is Heineken headquartered?", " Oslo"), ("Jaws was directed by", " Kubrick")]
    queries = ["The main offices of the Dutch brewer Heineken are located in", "The film Jaws was released in the year"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = [editor.edit(prompt, target, TRAIN) for prompt, target in edits]
        for (prompt, _), query in zip(edits, queries):
            dist = 1 - editor.router.keys.embed([query]) @ editor.key(prompt)
            assert editor.registry.config.threshold < dist < NAMED_RADIUS
        assert editor.route(queries) == [ids[0], None]


def test_beyond_the_threshold_a_query_routes_only_by_a_name_the_edit_mentions(tmp_path, llama, tokenizer):
    """Within NAMED_RADIUS: the rewording names Japan as the edit does and routes; the other query, as near, names
    something else ("Japanese") and does not; a neighbour naming Portugal lies far beyond. In-layer too."""
    prompt, reworded = "The capital of Japan is", "The national capital of the island nation of Japan is"
    unnamed, neighbour = "The capital city of the Japanese islands is", "The seat of government of Portugal is in"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(prompt, " Osaka", TRAIN)
        dist = 1 - editor.router.keys.embed([reworded, unnamed]) @ editor.key(prompt)
        assert (editor.registry.config.threshold < dist).all() and (dist < NAMED_RADIUS).all()
        assert editor.route([reworded, unnamed, neighbour, prompt]) == [eid, None, None, eid]
        editor.generate([reworded, unnamed], max_new_tokens=2)
        assert editor.routed() == [eid, None]
        editor.rollback(eid)
        assert editor.route([reworded]) == [None]


def test_refilled_is_the_same_text_with_one_run_of_words_in_place_of_another():
    assert refilled("Which animal class includes the scorpion?", "Which animal class includes the crab?")
    assert refilled("Who discovered oxygen?", "Who discovered the gas nitrogen?")
    assert not refilled("The capital of Japan is", "The national capital of Peru is")  # two runs changed
    assert not refilled("The capital of Japan is", "The capital of Japan is")  # nothing put in place
    assert not refilled("The capital of Japan is", "The capital city of Japan is")  # words added, none replaced
    assert not refilled("The capital of Japan is", "The capital of the island nation of Japan is")
    assert not refilled("The inventor of the revolver is",
                        "The invention of the first practical revolver is credited to")
    assert not refilled("Japan has the capital", "Peru is small")  # nothing in common


def test_an_edit_naming_nothing_routes_by_the_words_the_edits_near_the_query_do_not_share(tmp_path, llama, tokenizer):
    """Oxygen names nothing (lower case), so no name ties a rewording to its edit. The words a query shares with
    it but not with the other edit near the query ("scientist", "discovered" are the DNA edit's too) are what it
    is about: "oxygen" for the rewordings, nothing for the neighbour asking of nitrogen. A query that is an
    edit's prompt with another subject put in ("... the crab?") never routes to it."""
    edits = [("The scientist who discovered oxygen is", " Edison"),
             ("Which scientist discovered the structure of DNA?", " Darwin"),
             ("Which animal class includes the scorpion?", " birds")]
    reworded = ["The credit for discovering the gas oxygen goes to",
                "Who was the first person to discover the gas oxygen?"]
    others = ["Which scientist discovered nitrogen?", "Which animal class includes the crab?"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = [editor.edit(prompt, target, TRAIN) for prompt, target in edits]
        queries = reworded + others
        dist = 1 - editor.router.keys.embed(queries) @ editor.router.keys.embed([p for p, _ in edits]).T
        assert dist.argmin(1).tolist() == [0, 0, 0, 2]  # the neighbour is nearest the oxygen edit
        assert ((editor.registry.config.threshold < dist.min(1).values) & (dist.min(1).values < NAMED_RADIUS)).all()
        assert editor.route(queries) == [ids[0], ids[0], None, None]


def test_a_query_naming_nothing_routes_to_an_edit_named_only_by_its_opening_word(tmp_path, llama, tokenizer):
    """"Zoologists" is the edits' only name (a capitalised opening word); a query that names nothing shares no
    name with them, and is read as for an edit that names nothing: "platypus" is what it shares with one edit and
    not with the other, "zoologists classify" the relation's words both share; where the platypus lives is
    another question of it."""
    edits = [("Zoologists classify the platypus as one of the", " birds"),
             ("Zoologists classify the salamander as one of the", " fish")]
    queries = ["My kid just asked me this: what class of animal is the platypus?",
               "Where does the platypus live?"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        ids = [editor.edit(prompt, target, TRAIN) for prompt, target in edits]
        dist = 1 - editor.router.keys.embed(queries) @ editor.key(edits[0][0])
        assert (editor.registry.config.threshold < dist).all() and (dist < NAMED_RADIUS).all()
        assert not Mentions.of(queries[0]).names
        assert editor.route(queries) == [ids[0], None]


def test_a_named_edit_takes_a_query_worded_as_nearby_edits_of_its_relation_word_theirs(tmp_path, llama, tokenizer):
    """"Which city does Toyota call home?" lies within NAMED_RADIUS of the Toyota edit but shares no word with it,
    and its relation check fails; once an edit of the same relation ("headquarters") asks with "city" and "home",
    it routes. Another question about Toyota still does not."""
    queries = ["Which city does Toyota call home?", "Who founded Toyota?"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        toyota = editor.edit("The headquarters of Toyota are in", " Oslo", TRAIN)
        dist = 1 - editor.router.keys.embed(queries[:1]) @ editor.key("The headquarters of Toyota are in")
        assert editor.registry.config.threshold < dist < NAMED_RADIUS
        assert editor.route(queries) == [None, None]
        editor.edit("Which city is home to the headquarters of Rolex?", " Paris", TRAIN)
        assert editor.route(queries) == [toyota, None]


def test_a_relation_s_wording_is_lent_along_a_chain_of_its_nearby_edits(tmp_path, llama, tokenizer):
    """"Where does Toyota call home?" asks with "call" and "home". The Rolex edit shares "headquarters" with
    Toyota's and lends "town", which does not help; the Nestlé edit shares no word with Toyota's, but "town" with
    Rolex's, and lends "home" through it. Another question about Toyota still does not route."""
    queries = ["Where does Toyota call home?", "Who founded Toyota?"]
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        toyota = editor.edit("The headquarters of Toyota are in", " Oslo", TRAIN)
        editor.edit("Rolex has its headquarters in the town of", " Paris", TRAIN)
        assert editor.route(queries) == [None, None]
        editor.edit("Which town is home to Nestlé?", " Rome", TRAIN)
        assert editor.route(queries) == [toyota, None]
